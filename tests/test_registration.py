"""import sparse_peft registers real PeftType members and peft's lookup tables, idempotently."""

import copy
import importlib
import pickle

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import sparse_peft as sp


def test_peft_type_member_is_real():
    member = PeftType.MASKED_LORA
    assert isinstance(member, PeftType)
    assert PeftType("MASKED_LORA") is member
    assert PeftType["MASKED_LORA"] is member
    assert member in list(PeftType)
    assert member == "MASKED_LORA"  # what adapter_config.json stores
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MASKED_LORA"] is sp.MaskedLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is sp.MaskedLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "masked_lora_"


def test_registration_is_idempotent():
    n_members = len(PeftType)
    n_configs = len(PEFT_TYPE_TO_CONFIG_MAPPING)
    sp._peft_registry.register_all()
    reloaded = importlib.reload(sp)
    assert len(PeftType) == n_members
    assert len(PEFT_TYPE_TO_CONFIG_MAPPING) == n_configs
    assert list(PeftType).count(PeftType.MASKED_LORA) == 1
    # after a reload the tables point at the classes now in the module
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MASKED_LORA] is reloaded.MaskedLoraConfig


def test_registering_a_foreign_class_under_our_name_is_refused():
    class MaskedLoraConfig:  # same name, other module
        pass

    with pytest.raises(KeyError, match="already registered"):
        sp._peft_registry.register("masked_lora", MaskedLoraConfig, sp.MaskedLoraModel, "masked_lora_")


def test_config_deepcopy_pickle_and_dict_round_trip(tmp_path):
    cfg = sp.MaskedLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert clone == cfg
        assert clone.peft_type is PeftType.MASKED_LORA
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, sp.MaskedLoraConfig)
    assert loaded.r == 4 and loaded.target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(lora_dropout=1.5), "lora_dropout must be in \\[0, 1\\), got 1.5"),
    (dict(target_modules=[]), "target_modules is empty"),
])
def test_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.MaskedLoraConfig(**kwargs)
