"""Hydra composition and typed validation: the overrides users type, and errors that say how to fix them."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rayflow.cli import job_from_hydra
from rayflow.config import ConfigError, JobConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _job(*overrides: str) -> JobConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return job_from_hydra(compose(config_name="config", overrides=list(overrides)))


def test_default_is_the_offline_mnist_demo():
    job = _job()
    assert job.task == "demo" and job.data.source == "mnist" and job.data.resolution == 16
    assert job.distill.steps == 8 and job.distill.algorithm == "alternating"
    assert (job.distill.beta1, job.distill.beta2, job.distill.adam_eps) == (0.0, 0.99, 1e-12)
    assert job.tracking.resolved_uri().startswith("sqlite:////")


def test_user_overrides_land_in_typed_fields():
    job = _job("distill.steps=4", "distill.lr_student=3e-5", "distill.lr_ratio=2", "resources.num_workers=2",
               "resources.use_gpu=true", "tracking.uri=http://127.0.0.1:5000", "run.name=mine",
               "run.storage_path=/tmp/x", "teacher.checkpoint=/tmp/t.pt", "distill=parameter_space")
    assert job.distill.steps == 4 and job.distill.lr_aux == pytest.approx(6e-5)
    assert job.resources.num_workers == 2 and job.resources.use_gpu
    assert job.tracking.resolved_uri() == "http://127.0.0.1:5000"
    assert job.run.absolute_storage() == "/tmp/x" and job.teacher.checkpoint == "/tmp/t.pt"
    assert job.distill.algorithm == "parameter_space"
    flat = job.flat()
    assert flat["distill.steps"] == 4 and flat["resources.num_workers"] == 2


def test_channels_last_is_a_typed_key_off_by_default():
    assert _job().resources.channels_last is False
    job = _job("resources.channels_last=true")
    assert job.resources.channels_last is True and job.flat()["resources.channels_last"] is True
    assert JobConfig.from_dict(job.to_dict()).resources.channels_last is True
    assert _job("resources.channels_last=true", "task=teacher", "distill=parameter_space").resources.channels_last


def test_smoke_experiment_selects_tiny_settings():
    job = _job("experiment=smoke")
    assert job.run.name == "smoke" and job.data.source == "digits" and job.model.channels == 16


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["distill.steps=0"], "distill.steps"),
        (["distill.algorithm=dmd"], "distill.algorithm"),
        (["data.batch_size=63", "resources.num_workers=2"], "data.batch_size"),
        (["task=distill", "teacher.checkpoint=null"], "teacher.checkpoint"),
        (["tracking.uri=./mlruns"], "tracking.uri"),
        (["data=imagenet64", "data.path=null"], "data.path"),
        (["model.attn_levels=[5]"], "model.attn_levels"),
        (["resources.channels_last=true", "distill=parameter_space"], "resources.channels_last"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _job(*overrides)
    assert "FIX THIS" in str(e.value)


def test_unknown_keys_are_rejected_with_the_known_ones():
    with pytest.raises(ConfigError, match="distill.stepz"):
        JobConfig.from_dict({"distill": {"stepz": 3}})
    with pytest.raises(Exception, match="stepz"):  # Hydra's struct mode catches typos first
        _job("distill.stepz=3")


@pytest.mark.parametrize("overrides", [
    ("experiment=text_demo",),
    ("data=webdataset", "data.path=/shards", "data.text_encoder=minilm", "data.caption_key=json"),
    ("data=parquet", "data.path=/shards", "data.text_encoder=precomputed", "data.text_dim=384"),
    ("experiment=text_demo", "data.source=parquet", "data.path=/shards", "data.caption_column=text"),
])
def test_text_keys_compose_as_typed(overrides):
    # every key the README's text-to-image commands use exists in the composed YAML (Hydra's struct mode)
    job = _job(*overrides)
    assert job.data.text and job.data.text_dim == 384 and job.data.null_condition == 0
    if "experiment=text_demo" in overrides:
        assert job.teacher.guidance_scale == 2.0 and job.model.attn_levels == [1, 2] and job.teacher.sha256


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("net", "space"):  # free-form mappings are values
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_hydra_knows_every_key_its_type_and_default():
    # the dataclasses are Hydra's schema (rayflow.cli.register_schema): `--cfg job` shows every key
    from omegaconf import OmegaConf

    from rayflow.cli import force_add

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config")
        with pytest.raises(Exception) as err:  # a typed key refuses a value of another type
            compose(config_name="config", overrides=["distill.steps=abc"])
        assert "could not be converted to Integer" in str(err.value.__cause__)
        overrides = ["+teacher=edm", force_add("+teacher.sigma_min=0.01"), "teacher.net._target_=a.b", "eval.labels=7"]
        job = job_from_hydra(compose(config_name="config", overrides=overrides))
    assert set(JobConfig().flat()) <= set(_leaves(OmegaConf.to_container(cfg)))
    assert job.teacher.sigma_min == 0.01 and job.eval.labels == [7]  # `+` for a key the YAML used to leave out


def test_yaml_only_selects_and_overrides():
    # One value, one home: a YAML value equal to its dataclass default is there only with a comment saying why,
    # or (in an experiment) because conf/config.yaml or a group option sets another value it must undo.
    import yaml

    from rayflow.config import SweepConfig

    defaults = {**JobConfig().flat(), **{f"sweep.{k}": v for k, v in SweepConfig().to_dict().items()}}
    conf = Path(CONF)
    files = {p: yaml.safe_load(p.read_text()) or {} for p in sorted(conf.rglob("*.yaml"))}
    values = {}
    for p, d in files.items():
        group = p.parent.name if p.parent != conf and p.parent.name != "experiment" else ""
        values[p] = {k: v for k, v in _leaves(d, f"{group}." if group else "").items()
                     if k.split(".")[0] not in ("defaults", "hydra")}
    shadowed = {k for p, kv in values.items() if p.parent.name != "experiment"
                for k, v in kv.items() if k in defaults and v != defaults[k]}
    restated = []
    for p, kv in values.items():
        lines = p.read_text().splitlines()
        for key, v in kv.items():
            leaf = key.rsplit(".", 1)[-1]
            commented = any(ln.strip().startswith(f"{leaf}:") and "#" in ln for ln in lines)
            if key in defaults and v == defaults[key] and not commented and not (
                    p.parent.name == "experiment" and key in shadowed):
                restated.append(f"{p.relative_to(conf)}: {key}")
    assert not restated, restated
