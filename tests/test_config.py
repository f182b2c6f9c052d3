import dataclasses
from typing import Literal

import pydantic
import pytest

from emergent.config import ConfigError, RayConfig, RunConfig, config, config_hash, load


@config
class Inner:
    lr: float = 1e-4
    """learning rate"""
    steps: int = 10
    """steps"""
    mode: Literal["full", "lora"] = "full"
    """which"""

    def __post_init__(self):
        if not 0 < self.lr < 1:
            raise ValueError(f"inner.lr must be in (0, 1), got {self.lr}")


@config
class Job:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    inner: Inner = dataclasses.field(default_factory=Inner)
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])
    """dose fractions"""


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "inner:\n  lr: 0.001\n  mode: lora\nrun:\n  name: exp\n")
    cfg = load(Job, p, ["inner.steps=7", "fractions=[0.1, 0.5]", "ray.address=auto"])
    assert cfg.inner.lr == 0.001 and cfg.inner.mode == "lora" and cfg.inner.steps == 7
    assert cfg.fractions == [0.1, 0.5] and cfg.run.name == "exp" and cfg.ray.address == "auto"
    assert load(Job).inner.steps == 10


def test_layered_files_merge_sections_and_replace_lists(tmp_path):
    base = write(tmp_path, "inner:\n  lr: 0.001\n  mode: lora\nfractions: [0.1]\n")
    more = tmp_path / "more.yaml"
    more.write_text("inner:\n  steps: 3\nfractions: [0.2, 0.3]\n")
    cfg = load(Job, [base, more], ["inner.steps=4"])
    # the later file merges into the section (lr, mode kept), its list replaces the earlier one,
    # and --set still wins over both
    assert (cfg.inner.lr, cfg.inner.mode, cfg.inner.steps) == (0.001, "lora", 4)
    assert cfg.fractions == [0.2, 0.3]
    # an error names the file that set the key, and its line there
    more.write_text("run:\n  name: x\ninner:\n  steps: many\n")
    with pytest.raises(ConfigError, match=rf"^{more}:4: inner.steps: "):
        load(Job, [base, more])
    more.write_text("inner:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=rf"^{base}:5: inner.mode: "):
        load(Job, [write(tmp_path, "run:\n  name: x\n\ninner:\n  mode: half\n"), more])


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "run:\n  name: exp\ninner:\n  lr: 0.001\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load(Job, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:5: inner.stepz: unknown key")
    assert "steps" in msg and "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:1: inr: unknown key"):
        load(Job, write(tmp_path, "inr:\n  lr: 0.1\n"))


def test_wrong_type_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "inner:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load(Job, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: inner.steps: ") and "integer" in msg and "'many'" in msg


def test_bad_choice_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"inner.mode: .*'full'.*'lora'"):
        load(Job, write(tmp_path, "inner:\n  mode: half\n"))
    with pytest.raises(ConfigError, match=r":2: inner.lr: must be in \(0, 1\), got 5.0"):
        load(Job, write(tmp_path, "inner:\n  lr: 5\n"))
    with pytest.raises(ConfigError, match=r"^--set ray.num_cpus=0: must be >= 1, got 0$"):
        load(Job, None, ["ray.num_cpus=0"])


def test_override_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--set inner.steps=x: "):
        load(Job, None, ["inner.steps=x"])
    with pytest.raises(ConfigError, match=r"expected key.sub=value"):
        load(Job, None, ["inner.steps"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:3: invalid YAML"):
        load(Job, write(tmp_path, "inner:\n  lr: [1,\n"))
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read config"):
        load(Job, tmp_path / "nope.yaml")


def test_construction_validates_and_hash_tracks_config():
    with pytest.raises(pydantic.ValidationError):
        Inner(lr="fast")
    a, b = Job(), Job(inner=Inner(steps=11))
    assert config_hash(a) == config_hash(Job()) != config_hash(b)


def test_cli_exits_with_one_line(tmp_path, capsys):
    from emergent.config import parse_args

    p = write(tmp_path, "inner:\n  steps: many\n")
    with pytest.raises(SystemExit) as e:
        parse_args(Job, ["--config", str(p)], "prog", None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "inner.steps" in err and str(p) in err


def test_duplicate_key_and_numeric_name(tmp_path):
    p = write(tmp_path, "inner:\n  lr: 0.1\nrun:\n  name: a\ninner:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"job.yaml:5: inner: duplicate key \(first at line 1\)"):
        load(Job, p)
    assert load(Job, None, ["run.name=2024"]).run.name == "2024"
    assert load(Job, None, ["inner.lr=1e-3"]).inner.lr == 1e-3  # PyYAML reads 1e-3 as a string


def test_other_jobs_sections_are_ignored_but_typos_fail(tmp_path):
    p = write(tmp_path, "inner:\n  lr: 0.1\nstudy:\n  seeds: [1]\n")
    assert load(Job, p).inner.lr == 0.1
    with pytest.raises(ConfigError, match="studdy: unknown key"):
        load(Job, write(tmp_path, "studdy:\n  seeds: [1]\n"))


def test_every_shipped_config_loads_for_its_jobs():
    """configs/**.yaml validate offline against every job whose section they hold (the real-model
    configs included: a typo there would only show on a GPU cluster)."""
    from pathlib import Path

    import yaml

    from emergent.english.job import DatasetsJob
    from emergent.evaluate import EvaluateJob
    from emergent.harvest import HarvestJob
    from emergent.pipeline import PipelineJob
    from emergent.studies.monitor.study import MonitorJob
    from emergent.studies.persona.diffing import DiffJob
    from emergent.studies.persona.flagging import FlagJob
    from emergent.studies.persona.predict import PredictJob
    from emergent.studies.persona.realign import RealignJob
    from emergent.studies.persona.steering import SteerJob
    from emergent.studies.world.study import WorldStudyJob
    from emergent.train.finetune import FinetuneJob
    from emergent.train.rl import RLJob
    from emergent.train.sae import TrainSAEJob
    from emergent.train.world_job import WorldJob

    jobs = {
        "diff": DiffJob,
        "steer": SteerJob,
        "predict": PredictJob,
        "flag": FlagJob,
        "realign": RealignJob,
        "pipeline": PipelineJob,
        "world": WorldJob,
        "study": WorldStudyJob,
        "finetune": FinetuneJob,
        "rl": RLJob,
        "evaluate": EvaluateJob,
        "harvest": HarvestJob,
        "train_sae": TrainSAEJob,
        "datasets": DatasetsJob,
        "monitor": MonitorJob,
    }
    files = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        sections = yaml.safe_load(path.read_text()).keys()
        own = [cls for key, cls in jobs.items() if key in sections]
        assert own, f"{path}: no job section"
        for cls in own:
            load(cls, path)


def test_every_job_key_is_documented_in_help():
    from emergent.cli import JOBS
    from emergent.config import describe

    for job in JOBS:
        module = __import__(f"jobs.{job.replace('-', '_')}", fromlist=["cli"])
        cls = next(v for k, v in vars(module).items() if k.endswith("Job") and isinstance(v, type))
        for line in describe(cls):
            assert not line.rstrip().endswith("):"), f"{job}: undocumented key {line.strip()}"
