"""The files in deploy/: promtool accepts the Prometheus config and alert rules; the dashboard is importable and
every query in it and in the alerts uses only metric names the project exports (or vLLM's documented ones);
the KubeRay manifests validate against schemas (Kubernetes' own for core objects and pod templates, the
prometheus-operator CRD's models for the PodMonitor, a strict ray.io/v1 subset for RayJob/RayCluster); the
configs they mount load; ports agree across files; the Dockerfile copies what exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator.config import build_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"
METRICS_PORT = 9464


def test_promtool_checks_config_and_rules(promtool):
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_metric_name_extraction(deploy_files):
    names = deploy_files.metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(foo_bucket{a="b", c=~"x|y"}[5m]))) / bar offset 5m '
        'and on (ray_job_id) group_left () max without (le) (vllm:baz) > 1e3 unless label_replace(qux, "d", "$1", "e", "(.*)")'
    )
    assert names == {"foo_bucket", "bar", "vllm:baz", "qux"}


def test_every_query_uses_only_exported_metric_names(deploy_files):
    allowed = deploy_files.allowed_names()
    queries = deploy_files.dashboard_queries() + [(r["alert"], r["expr"]) for r in deploy_files.alert_rules()]
    assert len(queries) > 30
    used: set[str] = set()
    for where, expr in queries:
        names = deploy_files.metric_names(deploy_files.substitute(expr))
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= allowed, f"{where}: unknown metric(s) {sorted(names - allowed)} in {expr!r}"
        used |= names
    # the panels: retention, throughput, latency, lag, merges, publish version, freshness, tokens/s
    for name in (
        "wisestream_retention",
        "wisestream_edits_applied_total",
        "wisestream_edit_latency_seconds_bucket",
        "wisestream_consumer_lag_messages",
        "wisestream_merges_total",
        "wisestream_published_version",
        "wisestream_freshness_seconds_bucket",
        "vllm:generation_tokens_total",
    ):
        assert name in used, name


def test_dashboard_is_importable(deploy_files):
    d = deploy_files.dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"] for v in d["templating"]["list"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, f"{p['title']}: ${var} undefined"


# ---------------------------------------------------------------------------------------------- manifests


def _pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict]]:
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def validate_core(obj: dict[str, Any], what: str = "") -> None:
    """A core Kubernetes object against Kubernetes' own schema (strict: unknown fields fail).

    Raises:
        ValueError: the object does not validate (the message names the field).
    """
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise ValueError(f"{what or obj['kind']} at {list(err.path)}: {err.message}") from None


def validate_ray_object(obj: dict[str, Any]) -> None:
    """RayJob/RayCluster against the strict ray.io/v1 subset, each pod template against Kubernetes' schema.

    Raises:
        ValueError: the object does not validate (the message names the field).
    """
    schema = yaml.safe_load((Path(__file__).parent / "ray_io_v1.schema.yaml").read_text())
    validator = jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{obj['kind']}"})
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise ValueError(f"{obj['kind']} at {list(error.absolute_path)}: {error.message}")
    for name, template in _pod_templates(obj):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        validate_core(pod_template, f"pod template {name}")


def _unknown_keys(given: Any, known: Any, path: str = "") -> list[str]:
    """Keys of ``given`` that a model dump ``known`` does not have (pydantic drops unknown fields silently)."""
    if isinstance(given, dict):
        if not isinstance(known, dict):
            return [path]
        return [
            p for k, v in given.items() for p in _unknown_keys(v, known.get(k), f"{path}.{k}") if k in known
        ] + [f"{path}.{k}" for k in given if k not in known]
    if isinstance(given, list) and isinstance(known, list):
        return [
            p
            for i, (a, b) in enumerate(zip(given, known, strict=False))
            for p in _unknown_keys(a, b, f"{path}[{i}]")
        ]
    return []


def validate_podmonitor(obj: dict[str, Any]) -> None:
    """A PodMonitor against the prometheus-operator CRD's models (cloudcoil), unknown fields included.

    Raises:
        pydantic.ValidationError, AssertionError: the object does not validate.
    """
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    dumped = PodMonitor.model_validate(obj).model_dump(by_alias=True, exclude_none=True, mode="json")
    unknown = _unknown_keys(obj, dumped)
    assert not unknown, f"unknown fields {unknown}"


def test_manifests_validate_against_their_schemas(deploy_files):
    objects = deploy_files.manifests()
    kinds = sorted(k.split("/")[0] for k in objects)
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "PodMonitor", "RayCluster", "RayJob"]
    for key, obj in objects.items():
        kind = obj["kind"]
        if kind in ("RayJob", "RayCluster"):
            validate_ray_object(obj)
        elif kind == "PodMonitor":
            validate_podmonitor(obj)
        else:
            validate_core(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "wisestream", key


@pytest.mark.parametrize(
    ("kind", "mutate", "message"),
    [
        (
            "RayJob",
            lambda o: o["spec"].update(entrypont=o["spec"].pop("entrypoint")),
            "'entrypoint' is a required",
        ),
        ("RayJob", lambda o: o["spec"].update(submissionMode="K8sJob"), "'K8sJob' is not one of"),
        (
            "RayJob",
            lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(x=1),
            "1 is not of type 'string'",
        ),
        (
            "RayCluster",
            lambda o: o["spec"]["workerGroupSpecs"][0].update(replica=2),
            "('replica' was unexpected)",
        ),
        (
            "RayCluster",
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"].update(
                containres=o["spec"]["headGroupSpec"]["template"]["spec"].pop("containers")
            ),
            "pod template head at ['template', 'spec']",
        ),
        (
            "PodMonitor",
            lambda o: o["spec"]["podMetricsEndpoints"][0].update(pathh="/m"),
            "podMetricsEndpoints[0].pathh",
        ),
        ("PodMonitor", lambda o: o["spec"].update(selector="app"), "spec.selector\n  Input should be"),
        ("ConfigMap", lambda o: o.update(date=o.pop("data")), "('date' was unexpected)"),
    ],
)
def test_validators_reject_typos(deploy_files, kind, mutate, message):
    obj = next(o for o in deploy_files.manifests().values() if o["kind"] == kind)
    mutate(obj)
    validate = {
        "RayJob": validate_ray_object,
        "RayCluster": validate_ray_object,
        "PodMonitor": validate_podmonitor,
    }
    with pytest.raises((ValueError, AssertionError), match=re.escape(message)):
        validate.get(kind, validate_core)(obj)


def test_mounted_job_configs_load_and_export_metrics(deploy_files):
    data = deploy_files.manifests()["ConfigMap/wisestream-config"]["data"]
    assert set(data) == {"job.yaml", "stream.yaml"}
    for name, text in data.items():
        assert text.startswith("# wisestream run /etc/wisestream/"), name
        cfg = build_config(yaml.safe_load(text))
        assert cfg.metrics.port == METRICS_PORT and cfg.metrics.host == "0.0.0.0", name
        assert cfg.output.dir.startswith("/data/runs/"), name
        for path in (cfg.stream.path, cfg.irrelevant.path):
            if path:  # shipped in the image under /opt/wisestream (Dockerfile: COPY data/ data/)
                assert (ROOT / Path(path).relative_to("/opt/wisestream")).is_file(), path
    assert build_config(yaml.safe_load(data["stream.yaml"])).stream.kind == "kafka"


def test_ports_and_mounts_agree_across_manifests(deploy_files):
    objects = deploy_files.manifests()
    endpoints = {e["port"] for e in objects["PodMonitor/wisestream"]["spec"]["podMetricsEndpoints"]}
    for key in ("RayJob/wisestream-counterfact", "RayCluster/wisestream"):
        obj = objects[key]
        templates = dict(_pod_templates(obj))
        ports = {
            name: {p["name"]: p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
            for name, t in templates.items()
        }
        assert ports["head"]["wisestream"] == METRICS_PORT, key
        assert all(p["metrics"] == 8080 for p in ports.values()), key
        assert endpoints <= set().union(*ports.values()), key
        for name, t in templates.items():
            labels = t["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "wisestream", (key, name)  # the PodMonitor selects it
            annotations = t["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/scrape") == "true":
                assert int(annotations["prometheus.io/port"]) in ports[name].values(), (key, name)
        head = templates["head"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
        assert mounts == {"config": "/etc/wisestream", "runs": "/data/runs"}, key
        volumes = {v["name"]: v for v in head["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "wisestream-config"
        assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "wisestream-runs"
    assert "PersistentVolumeClaim/wisestream-runs" in objects
    entrypoint = objects["RayJob/wisestream-counterfact"]["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["wisestream", "run"] and entrypoint[2] == "/etc/wisestream/job.yaml"


def test_dockerfile_copies_existing_paths_and_exposes_the_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY") and "--from" not in line]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    copied = {s.rstrip("/") for sources in copies for s in sources}
    # everything the package and `wisestream model` need, and the data the mounted configs read
    for needed in ("pyproject.toml", "README.md", "wise", "streams", "actors", "orchestrator", "data"):
        assert needed in copied, needed
    exposed = {int(p) for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert {METRICS_PORT, 8080, 8265, 8000} <= exposed
    assert "wisestream model" in text and 'pip install ".' in text
