import pytest

from seqpar.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, load_config


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_tiny_cpu_config_loads():
    cfg = load_config("configs/tiny-cpu.yaml")
    assert cfg.run.name == "tiny-cpu"
    assert cfg.model.n_heads % 4 == 0 and cfg.model.n_kv_heads < cfg.model.n_heads  # SP-ready GQA
    assert cfg.run.output_dir == "runs/tiny-cpu"


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path, "base.yaml", "model: {dim: 64, n_heads: 4}\ntrain: {steps: 7, lr: 1.0e-3}\n")
    child = _write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(child, ["model.n_layers=3", "train.lr=2e-3", "data.mode=concat_chunk", "run.name=x"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (64, 4, 3)
    assert cfg.train.steps == 9 and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.data.mode == "concat_chunk" and cfg.run.output_dir == "runs/x"


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = _write(tmp_path, "c.yaml", "train: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes' \(did you mean 'train.steps'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*did you mean 'model'"):
        load_config(None, ["modle.dim=3"])


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"train.steps='many' must be an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"data.mode='pakc' is not allowed \(did you mean 'pack'\?\); choose one of 'concat_chunk', 'pack'"):
        load_config(None, ["data.mode=pakc"])
    with pytest.raises(ConfigError, match=r"data.mode='chunks' is not allowed; choose one of 'concat_chunk', 'pack'"):
        load_config(None, ["data.mode=chunks"])
    with pytest.raises(ConfigError, match=r"kernels.attention='flash'.*'auto', 'triton', 'reference'"):
        load_config(None, ["kernels.attention=flash"])
    with pytest.raises(ConfigError, match="model.tie_embeddings=.*must be a bool"):
        load_config(None, ["model.tie_embeddings=3"])


def test_validation_in_dataclasses_for_programmatic_users():
    with pytest.raises(ConfigError, match=r"parallel.sp=4 must equal parallel.ulysses\(2\) x parallel.ring\(1\) = 2"):
        ParallelConfig(sp=4, ulysses=2, ring=1)
    with pytest.raises(ConfigError, match="model.n_heads=6 must be a multiple of model.n_kv_heads=4"):
        ModelConfig(n_heads=6, n_kv_heads=4, dim=96)
    with pytest.raises(ConfigError, match="data.tokens_per_step=1000 must be a positive multiple of data.seq_len=512"):
        DataConfig(seq_len=512, tokens_per_step=1000)
    assert Config().model.n_kv_heads == Config().model.n_heads


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "bad.yaml", "model: [\n"))
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.steps"])


def test_save_config_round_trip(tmp_path):
    from seqpar.config import save_config

    cfg = load_config("configs/tiny-cpu.yaml", ["train.steps=3"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_sp_algorithm_must_agree_with_degrees():
    assert ParallelConfig(sp=4, ring=4).algorithm == "ring" and ParallelConfig(sp=4, ring=4).layout == "zigzag"
    assert ParallelConfig(sp=4, ulysses=4).algorithm == "ulysses" and ParallelConfig(sp=4, ulysses=4).layout == "contiguous"
    assert ParallelConfig(sp=4, ulysses=2, ring=2).algorithm == "hybrid"
    with pytest.raises(ConfigError, match="parallel.algorithm=ring does not agree with ulysses=4, ring=1: it needs parallel.ulysses=1"):
        ParallelConfig(sp=4, ulysses=4, algorithm="ring")
    with pytest.raises(ConfigError, match="parallel.algorithm=hybrid does not agree"):
        ParallelConfig(sp=4, ring=4, algorithm="hybrid")
    with pytest.raises(ConfigError, match="parallel.layout='zig' is not allowed \\(did you mean 'zigzag'\\?\\)"):
        ParallelConfig(sp=2, ring=2, layout="zig")
