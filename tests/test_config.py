"""The job config (mhd_hpc/config/): defaults, YAML + overrides, errors naming the key, docs."""


import pytest
import yaml

from mhd_hpc.job import load_job as load_config  # the config's rules and the domain's
from mhd_hpc.config import (ConfigError, JobConfig, check_world_size,
                            markdown_table, parse_override, reference)

from conftest import ROOT

JOB = str(ROOT / "jobs" / "digits.yaml")


def error_key(*overrides: str, path: str | None = JOB) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.key


def test_job_file_loads_and_overrides_apply():
    cfg = load_config(JOB, ["distill.nu_aux=1", "topology.kind=cycle", "clients.count=3",
                            "clients.arch=[cnn_small, resnet18, cnn_small]", "model.embedding_dim=64"])
    assert cfg.distill.nu_aux == 1.0 and isinstance(cfg.distill.nu_aux, float)
    assert cfg.topology.kind == "cycle"
    assert cfg.client_archs() == ["cnn_small", "resnet18", "cnn_small"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(JOB, ["run.seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, key", [
    ("distil.nu_aux=3", "distil"),                       # misspelt section
    ("distill.nu_auxx=3", "distill.nu_auxx"),            # misspelt field
    ("distill.nu_aux=lots", "distill.nu_aux"),           # wrong type
    ("run.steps=1.5", "run.steps"),                      # float for int
    ("distill.skip_less_confident=3", "distill.skip_less_confident"),
    ("method=magic", "method"),
    ("topology.kind=torus", "topology.kind"),
    ("distill.selection=best", "distill.selection"),
    ("data.labels_per_client=11", "data.labels_per_client"),   # more primary labels than classes
    ("data.public_fraction=1.0", "data.public_fraction"),
    ("clients.arch=vgg", "clients.arch"),
    ("clients.arch=[cnn_small, cnn_small]", "clients.arch"),   # 2 names for 4 clients
    ("exchange.top_k=11", "exchange.top_k"),
    ("run.steps=0", "run.steps"),
])
def test_bad_values_name_their_key(override, key):
    assert error_key(override) == key


def test_even_assignment_must_divide():
    # 4 clients x 3 labels = 12 is not a multiple of 10 classes.
    assert error_key("data.label_assignment=even") == "data.label_assignment"
    load_config(JOB, ["data.label_assignment=even", "data.labels_per_client=5"])


def test_edges_naming_missing_clients():
    assert error_key("topology.kind=edges", "topology.edges=[[0,1],[1,7]]") == "topology.edges[1]"
    assert error_key("topology.kind=edges", "topology.edges=[[2,2]]") == "topology.edges[0]"
    assert error_key("topology.kind=edges") == "topology.edges"


def test_islands_must_partition_clients():
    assert error_key("topology.kind=islands", "topology.islands=[[0,1],[1,2,3]]") \
        == "topology.islands[1]"
    assert error_key("topology.kind=islands", "topology.islands=[[0,1],[2]]") == "topology.islands"
    assert error_key("topology.kind=islands", "topology.islands=9") == "topology.islands"


def test_weight_averaging_needs_one_architecture():
    archs = "clients.arch=[cnn_small, resnet18, cnn_small, cnn_small]"
    assert error_key("method=fedavg", archs, "model.embedding_dim=32") == "clients.arch"
    assert error_key("method=supervised", archs, "model.embedding_dim=32") == "clients.arch"


def test_embedding_distillation_across_widths_needs_shared_dim():
    archs = "clients.arch=[cnn_small, resnet18, cnn_small, cnn_small]"
    assert error_key(archs) == "model.embedding_dim"
    load_config(JOB, [archs, "distill.nu_emb=0"])
    load_config(JOB, [archs, "model.embedding_dim=64"])


def test_malformed_inputs():
    assert error_key("novalue") == "novalue"
    assert error_key(path="/nonexistent/job.yaml") == "<job file>"


def test_world_size_must_match():
    cfg = JobConfig()
    check_world_size(cfg, cfg.clients.count)
    with pytest.raises(ConfigError, match="mpirun -np 4") as info:
        check_world_size(cfg, 3)
    assert info.value.key == "clients.count"


def test_hosting_several_clients_per_rank():
    cfg = load_config(JOB, ["clients.count=8", "clients.per_rank=4"])
    assert cfg.num_ranks() == 2
    check_world_size(cfg, 2)
    with pytest.raises(ConfigError, match="mpirun -np 2"):
        check_world_size(cfg, 8)
    assert error_key("clients.count=6", "clients.per_rank=4") == "clients.per_rank"
    assert error_key("clients.per_rank=2", "clients.ranks_per_client=2") == "clients.per_rank"
    assert error_key("clients.per_rank=2", "data.loader=dali") == "clients.per_rank"
    assert error_key("clients.per_rank=0") == "clients.per_rank"


@pytest.mark.parametrize("job_file", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_file_is_valid_and_lists_every_option(job_file):
    load_config(str(job_file))
    job = yaml.safe_load(job_file.read_text())
    for key, _default, text in reference():
        assert text, f"{key} has no documentation"
        node = job
        for part in key.split("."):
            assert part in node, f"{job_file.name} lacks {key}"
            node = node[part]


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=true") == ("x", True)


def test_the_options_page_documents_every_option():
    page = (ROOT / "docs" / "options.md").read_text()
    for key, _default, _text in reference():
        assert f"| `{key}` |" in page, f"docs/options.md's table lacks {key}"


@pytest.mark.parametrize("key", ["optim.lr", "optim.momentum", "data.skew", "distill.nu_aux",
                                 "distill.nu_emb", "exchange.timeout_s", "optim.weight_decay",
                                 "data.public_fraction"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_non_finite_floats_are_refused_naming_the_key(key, value):
    assert error_key(f"{key}={value}") == key


def test_scientific_notation_is_accepted_for_numbers(tmp_path):
    cfg = load_config(JOB, ["optim.lr=1e-4", "run.steps=1e3", "exchange.timeout_s=2.5E1"])
    assert cfg.optim.lr == 1e-4 and cfg.exchange.timeout_s == 25.0
    assert cfg.run.steps == 1000 and isinstance(cfg.run.steps, int)
    job = tmp_path / "job.yaml"  # YAML 1.1 reads these as strings
    job.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5e-4\nrun:\n  steps: 2e3\n")
    cfg = load_config(str(job))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.run.steps) == (1e-4, 5e-4, 2000)
    assert error_key("run.steps=1e-1") == "run.steps"  # not integral
    assert error_key("run.out_dir=[1]") == "run.out_dir"


def test_config_names_the_topology_keys():
    from mhd_hpc.config import ConfigError

    job = str(ROOT / "jobs" / "digits.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(job, ["topology.kind=random", "topology.degree=5"])
    assert err.value.key == "topology.degree"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["topology.kind=random", "topology.resample_every=-1"])
    assert err.value.key == "topology.resample_every"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["data.public_source=everything"])
    assert err.value.key == "data.public_source"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["method=fedmd", "clients.per_client=[{ranks: 2}, {}, {}, {}]"])
    assert err.value.key == "clients.per_client"


def test_the_options_page_table_is_the_generated_one():
    """docs/options.md's table is ``python -m mhd_hpc.config --markdown``, not a copy kept by
    hand: regenerate it there when a key or its documentation changes."""
    page = (ROOT / "docs" / "options.md").read_text()
    begin = page.index("<!-- options:")
    table = page[page.index("\n", begin) + 1:page.index("<!-- /options -->")].strip()
    assert table == markdown_table().strip()
