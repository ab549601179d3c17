import pytest
import yaml

from mblm import MambaBlock, MBLMModelConfig, TransformerBlock
from mblm.train.config import (
    TrainEntryConfig,
    TrainMBLMIoConfig,
    TrainMBLMParams,
    apply_overrides,
    load_train_config,
)
from mblm.train.core.config import CoreTrainConfig


def seed_example_config() -> TrainEntryConfig:
    """The seed README's custom-dataset config, field for field."""
    return TrainEntryConfig(
        io=TrainMBLMIoConfig(
            dataset_dir="data/datasets/my-dataset",
            dataset_id="mydataset",
            name_model="my-model",
            output_dir="data/outputs",
            num_models_to_save=3,
            validate_amount=20,
            log_train_loss_amount=100,
        ),
        train=CoreTrainConfig(
            batch_size=1,
            target_elements=1000,
            target_elements_strategy="sequence",
            learning_rate=0.001,
            gradient_accumulate_every=4,
            gradient_clipping=1,
            shuffle_train=True,
            shuffle_eval=False,
        ),
        params=TrainMBLMParams(
            input_seq_len=128,
            num_tokens=257,
            hidden_dims=[512, 512],
            seq_lens=[16, 8],
            num_layers=[5, 5],
            pad_token_id=256,
            train_checkpoint_chunks=None,
            block=[
                MambaBlock(d_state=128, d_conv=4, expand=2, headdim=64, pos_emb_type=None),
                TransformerBlock(
                    attn_head_dims=64,
                    attn_num_heads=16,
                    attn_use_rot_embs=True,
                    use_flash_attn=True,
                    pos_emb_type="fixed",
                ),
            ],
        ),
    )


def test_seed_config_validates_with_defaults_for_new_sections():
    cfg = seed_example_config()
    assert cfg.ray.num_workers == 1 and cfg.ray.use_gpu is False
    assert cfg.mlflow.experiment_name == "mblm"
    model_cfg = cfg.params.model_config_only()
    assert type(model_cfg) is MBLMModelConfig and model_cfg.max_seq_len == 128


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = seed_example_config()
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_train_config(path) == cfg
    changed = load_train_config(
        path, ["train.learning_rate=3e-4", "ray.num_workers=2", "mlflow.run_name=abc"]
    )
    assert changed.train.learning_rate == 3e-4
    assert changed.ray.num_workers == 2 and changed.mlflow.run_name == "abc"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["train"].update(batch_sise=2), r"train\.batch_sise: Extra inputs"),
        (lambda d: d.update(trainer={}), r"trainer: Extra inputs"),
        (lambda d: d["train"].update(learning_rate=-1), r"train\.learning_rate: .*got -1"),
        (lambda d: d["params"].update(input_seq_len=4096), r"input_seq_len=4096 exceeds"),
        (lambda d: d["io"].update(num_models_to_save=30), r"num_models_to_save=30 exceeds"),
        (lambda d: d["train"].pop("batch_size"), r"train\.batch_size: Field required"),
        (lambda d: d["ray"].update(num_workers=0), r"ray\.num_workers: .*got 0"),
    ],
)
def test_bad_values_name_file_field_and_value(tmp_path, mutate, message):
    data = seed_example_config().model_dump(mode="json")
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message) as info:
        load_train_config(path)
    assert str(path) in str(info.value)


def test_malformed_and_missing_files(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("io: [unclosed\n")
    with pytest.raises(ValueError, match="malformed YAML"):
        load_train_config(path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_train_config(path)


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="expects key.path=value"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(ValueError, match="train is not a section"):
        apply_overrides({"train": 3}, ["train.learning_rate=1"])
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}
