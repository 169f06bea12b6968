"""The Helm chart (deploy/helm/prime) rendered by Helm's own engine and checked for meaning.

Helm is the Go library itself, loaded from the helm-python-sdk wheel (libhelm_c over Helm v4's
SDK): chart loading, rendering, `helm lint` and values.schema.json validation are Helm's code,
not a re-implementation. Every rendered object is validated offline against the Kubernetes
OpenAPI schemas that kubernetes-validate ships (strict: unknown fields are errors). The rest
checks what the manifests mean for a run: ranks, rendezvous, GPUs, sandbox, token, wiring.

Run with the project venv: `make test-deploy` (part of `make test`).
"""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
import tomllib
import unittest
from pathlib import Path
from urllib.parse import urlparse

import helm_python as helm
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "prime"
MULTI_NODE = CHART / "examples" / "multi-node.yaml"
RELEASE = "run1"
NAMESPACE = "train"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ["1.30", "1.37"]
# Kinds from CRDs, which have no upstream schema: checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
PRIME_SUBCOMMANDS = {"learner", "actor", "verifier", "prm-server"}
# Subcommands that land with open issues: their flags are checked once the binary has them.
PENDING_SUBCOMMANDS = {"prm-server": "issue 8 (prime prm-server --prm DIR --ref DIR --listen ADDR)"}


def example_values() -> dict:
    """The multi-node example, parsed by Helm as `-f` would."""
    return helm.values_from_yaml(MULTI_NODE.read_text())


def deep_merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, maps merged key by key (as Helm layers --set over -f)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def everything_on() -> dict:
    """Values that turn on every optional object, on top of the multi-node example."""
    values = example_values()
    values["prmServer"] = {"enabled": True}
    values["actors"]["autoscaling"] = {"enabled": True, "minReplicas": 4, "maxReplicas": 32}
    values["metrics"] = {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    values["verifier"]["sandbox"] = "bubblewrap"
    values["imagePullSecrets"] = [{"name": "regcred"}]
    values["learner"]["overrides"] = ["learner.steps=100", "learner.prm.beta=0.1"]
    values["learner"]["extraEnv"] = {"NCCL_IB_HCA": "mlx5", "NCCL_NET_GDR_LEVEL": 2}
    return values


CASES = {
    "defaults": lambda: None,
    "multi-node": example_values,
    "everything-on": everything_on,
    "cpu-only": lambda: {
        "learner": {"gpus": 0},
        "actors": {"gpus": 0},
        "prmServer": {"enabled": True, "gpus": 0},
    },
}


class Rendered:
    """One rendering of the chart: every object, by (kind, name)."""

    def __init__(self, values: dict | None, chart: helm.Chart):
        self.values = chart.merge_values(values)
        self.manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.objects: list[dict] = []
        for path, text in sorted(self.manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")]

    def component(self, component: str) -> dict:
        found = [
            o
            for o in self.workloads()
            if o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            == component
        ]
        if len(found) != 1:
            raise AssertionError(f"expected one workload for {component}, found {len(found)}")
        return found[0]


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str:
    """The value after `name` in an argument list (exactly once)."""
    positions = [i for i, a in enumerate(args) if a == name]
    assert len(positions) == 1, f"{name} appears {len(positions)} times in {args}"
    return args[positions[0] + 1]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def port_number(c: dict, name: str) -> int:
    matches = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    assert len(matches) == 1, f"container port {name}"
    return matches[0]


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class ChartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.chart = helm.Chart.load(CHART)
        cls.rendered = {case: Rendered(make(), cls.chart) for case, make in CASES.items()}
        print(
            f"\nHelm SDK {helm.helm_sdk_version()} (helm-c {helm.helm_c_version()}), "
            f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}"
        )

    @classmethod
    def tearDownClass(cls):
        cls.chart.close()

    # --- Helm's own checks ------------------------------------------------------------------

    def test_helm_lint_is_clean(self):
        for case, make in [("defaults", lambda: None), ("multi-node", example_values)]:
            for kube in KUBE_VERSIONS:
                report = helm.lint(CHART, make(), strict=True, kube_version=f"v{kube}.0")
                with self.subTest(case=case, kube=kube):
                    self.assertEqual(report["errors"], [])
                    self.assertEqual(report["total_charts_linted"], 1)
                    # severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended"
                    serious = [m for m in report["messages"] if m["severity"] >= 2]
                    self.assertEqual(serious, [])

    def test_lint_reports_bad_values(self):
        report = helm.lint(CHART, {"learner": {"replicas": -1}}, strict=True)
        text = " ".join(m["error"] for m in report["messages"]) + " ".join(report["errors"])
        self.assertIn("/learner/replicas", text)

    def test_good_values_pass_the_schema(self):
        for case, make in CASES.items():
            with self.subTest(case=case):
                self.chart.validate_schema(self.chart.merge_values(make()))

    def test_bad_values_fail_the_schema(self):
        bad = {
            "negative learner replicas": ({"learner": {"replicas": -1}}, "/learner/replicas"),
            "zero learner replicas": ({"learner": {"replicas": 0}}, "/learner/replicas"),
            "negative actor replicas": ({"actors": {"replicas": -3}}, "/actors/replicas"),
            "empty image": ({"image": {"repository": ""}}, "/image/repository"),
            "missing image": ({"image": {"repository": None}}, "repository"),
            "two GPUs per rank": ({"learner": {"gpus": 2}}, "/learner/gpus"),
            "unknown sandbox": ({"verifier": {"sandbox": "privileged"}}, "/verifier/sandbox"),
            "misspelt key": ({"learnr": {"replicas": 2}}, "learnr"),
            "root user": ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
            "port out of range": ({"learner": {"grpcPort": 70000}}, "/learner/grpcPort"),
            "bad override": ({"learner": {"overrides": ["no equals sign"]}}, "/learner/overrides"),
            "autoscaling without metrics": (
                {"actors": {"autoscaling": {"enabled": True, "metrics": []}}},
                "/actors/autoscaling",
            ),
            "bad quantity": ({"learner": {"shmSize": "lots"}}, "/learner/shmSize"),
        }
        for case, (values, where) in bad.items():
            with self.subTest(case=case):
                # rendering for an install validates the values first, as `helm install` does
                with self.assertRaises(helm.HelmValuesError) as raised:
                    self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
                self.assertIn(where, str(raised.exception))

    def test_rwx_run_volume_required_for_several_ranks(self):
        with self.assertRaises(helm.HelmRenderError) as raised:
            self.chart.render({"learner": {"replicas": 4}}, name=RELEASE, namespace=NAMESPACE)
        self.assertIn("ReadWriteMany", str(raised.exception))
        # an existing claim is the user's word that it is shared
        Rendered({"learner": {"replicas": 4, "runVolume": {"existingClaim": "shared"}}}, self.chart)

    # --- Kubernetes API schemas -------------------------------------------------------------

    def test_every_object_is_valid_kubernetes(self):
        for case, rendered in self.rendered.items():
            self.assertTrue(rendered.objects, case)
            for obj in rendered.objects:
                key = (obj["apiVersion"], obj["kind"])
                if key in CRD_KINDS:
                    continue
                for kube in KUBE_VERSIONS:
                    with self.subTest(case=case, kind=obj["kind"], name=obj["metadata"]["name"], kube=kube):
                        kubernetes_validate.validate(obj, kube, strict=True)

    def test_validator_catches_a_broken_object(self):
        # the validation above can fail: a misspelt field and a wrong type are both caught
        sts = copy.deepcopy(self.rendered["defaults"].one("StatefulSet"))
        sts["spec"]["replica"] = 1
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(sts, KUBE_VERSIONS[0], strict=True)
        sts = copy.deepcopy(self.rendered["defaults"].one("StatefulSet"))
        sts["spec"]["replicas"] = "eight"
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(sts, KUBE_VERSIONS[0], strict=True)

    def test_names_are_dns_labels(self):
        for case, rendered in self.rendered.items():
            for obj in rendered.objects:
                name = obj["metadata"]["name"]
                with self.subTest(case=case, name=name):
                    self.assertRegex(name, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
                    self.assertLessEqual(len(name), 63 if obj["kind"] != "StatefulSet" else 52)

    # --- learner ranks ----------------------------------------------------------------------

    def check_learner(self, rendered: Rendered, world_size: int):
        sts = rendered.one("StatefulSet")
        pod = sts["spec"]["template"]
        c = container(sts)
        env = env_of(c)
        name = sts["metadata"]["name"]
        self.assertEqual(sts["spec"]["replicas"], world_size)
        self.assertEqual(env["WORLD_SIZE"]["value"], str(world_size))
        self.assertEqual(sts["spec"]["podManagementPolicy"], "Parallel")
        self.assertTrue(selects(sts["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]))

        # the headless Service the ranks find each other through
        headless = rendered.one("Service", sts["spec"]["serviceName"])
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertTrue(headless["spec"]["publishNotReadyAddresses"])
        self.assertTrue(selects(headless["spec"]["selector"], pod["metadata"]["labels"]))

        # rank = pod ordinal, through the label the StatefulSet controller puts on each pod
        rank_ref = env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        self.assertEqual(rank_ref, "metadata.labels['apps.kubernetes.io/pod-index']")
        self.assertEqual(env["LOCAL_RANK"]["value"], "0")
        # the downward API as the kubelet resolves it, pod by pod: ranks 0..N-1, each once
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", rank_ref).group(1)
        ranks = [
            int({**pod["metadata"]["labels"], **self.controller_labels(sts, i)}[label])
            for i in range(sts["spec"]["replicas"])
        ]
        self.assertEqual(ranks, list(range(world_size)))

        # every rank gets rank 0's stable DNS name and the port rank 0 listens on
        master = env["MASTER_ADDR"]["value"]
        self.assertEqual(master, f"{name}-0.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local")
        master_port = int(env["MASTER_PORT"]["value"])
        self.assertEqual(port_number(c, "rendezvous"), master_port)
        self.assertIn(master_port, [p["port"] for p in headless["spec"]["ports"]])

        # the run: config from the ConfigMap, run dir on the volume, --resume after a restart
        args = c["args"]
        self.assertEqual(args[0], "learner")
        self.assertIn("--resume", args)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        config_path = Path(flag(args, "--config"))
        self.assertEqual(mounts["config"]["mountPath"], str(config_path.parent))
        config_map = rendered.one("ConfigMap", volumes["config"]["configMap"]["name"])
        self.assertIn(config_path.name, config_map["data"])
        run_dir = flag(args, "--run-dir")
        self.assertTrue(run_dir.startswith(mounts["runs"]["mountPath"] + "/"))
        self.assertEqual(port_number(c, "grpc"), listen_port(flag(args, "--listen")))
        self.assertEqual(port_number(c, "metrics"), listen_port(flag(args, "--metrics-listen")))

        # NCCL's shared memory and environment
        self.assertEqual(mounts["dshm"]["mountPath"], "/dev/shm")
        self.assertEqual(volumes["dshm"]["emptyDir"]["medium"], "Memory")
        self.assertIn("NCCL_DEBUG", env)
        return sts

    def test_learner_defaults(self):
        rendered = self.rendered["defaults"]
        self.check_learner(rendered, 1)
        claim = rendered.one("PersistentVolumeClaim")
        self.assertEqual(claim["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")

    def test_learner_multi_node(self):
        rendered = self.rendered["multi-node"]
        sts = self.check_learner(rendered, 8)
        env = env_of(container(sts))
        self.assertEqual(env["NCCL_SOCKET_IFNAME"]["value"], "eth0")
        claim = rendered.one("PersistentVolumeClaim")
        self.assertIn("ReadWriteMany", claim["spec"]["accessModes"])
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["runs"]["persistentVolumeClaim"]["claimName"], claim["metadata"]["name"])

    def test_learner_overrides_become_set_flags(self):
        args = container(self.rendered["everything-on"].one("StatefulSet"))["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        self.assertEqual(sets, ["learner.steps=100", "learner.prm.beta=0.1"])

    def test_config_map_is_the_paper_run(self):
        # the default run config is configs/eurus-2-7b.toml, key for key
        config_map = self.rendered["defaults"].one("ConfigMap")
        rendered = tomllib.loads(config_map["data"]["config.toml"])
        reference = tomllib.loads((REPO / "configs" / "eurus-2-7b.toml").read_text())
        self.assertEqual(rendered, reference)
        # and its paths are where the chart mounts the models and the data
        values = self.rendered["defaults"].values
        self.assertTrue(rendered["model"]["path"].startswith(values["models"]["mountPath"] + "/"))
        for path in rendered["learner"]["train_files"] + rendered["learner"]["heldout_files"]:
            self.assertTrue(path.startswith(values["data"]["mountPath"] + "/"))

    def test_config_change_restarts_the_learner(self):
        a = Rendered(None, self.chart).one("StatefulSet")
        b = Rendered({"runConfig": "[learner]\nsteps = 10\n"}, self.chart).one("StatefulSet")
        checksum = lambda s: s["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        self.assertNotEqual(checksum(a), checksum(b))

    # --- GPUs -------------------------------------------------------------------------------

    def test_gpu_limits(self):
        for case in ["defaults", "multi-node", "everything-on"]:
            rendered = self.rendered[case]
            gpu_components = ["learner", "actor"] + (["prm-server"] if case == "everything-on" else [])
            for component in gpu_components:
                with self.subTest(case=case, component=component):
                    c = container(rendered.component(component))
                    resources = c["resources"]
                    self.assertEqual(resources["limits"]["nvidia.com/gpu"], 1)
                    # a GPU request, if any, must equal the limit
                    self.assertIn(resources.get("requests", {}).get("nvidia.com/gpu", 1), (1,))
                    self.assertEqual(flag(c["args"], "--device"), "cuda")
            with self.subTest(case=case, component="verifier"):
                resources = container(rendered.component("verifier"))["resources"]
                for part in resources.values():
                    self.assertFalse([k for k in part if "gpu" in k])
        self.assertEqual(
            sum(
                w["spec"]["replicas"] * container(w)["resources"]["limits"].get("nvidia.com/gpu", 0)
                for w in self.rendered["multi-node"].workloads()
            ),
            8 + 16,
        )

    def test_cpu_only_and_mig(self):
        rendered = self.rendered["cpu-only"]
        for component in ["learner", "actor", "prm-server"]:
            c = container(rendered.component(component))
            self.assertEqual(flag(c["args"], "--device"), "cpu")
            self.assertFalse([k for k in c["resources"]["limits"] if "gpu" in k])
        mig = Rendered({"actors": {"gpuResource": "nvidia.com/mig-3g.40gb"}}, self.chart)
        limits = container(mig.component("actor"))["resources"]["limits"]
        self.assertEqual(limits, {"memory": "64Gi", "nvidia.com/mig-3g.40gb": 1})

    # --- verifier -----------------------------------------------------------------------------

    def test_verifier_has_no_egress(self):
        for case, rendered in self.rendered.items():
            verifier = rendered.component("verifier")
            labels = verifier["spec"]["template"]["metadata"]["labels"]
            policies = [
                p for p in rendered.all("NetworkPolicy")
                if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
            ]
            with self.subTest(case=case):
                self.assertEqual(len(policies), 1)
                spec = policies[0]["spec"]
                self.assertIn("Egress", spec["policyTypes"])
                self.assertEqual(spec.get("egress", []), [])
                # ingress only on the verifier's own ports, gRPC only from this release's pods
                c = container(verifier)
                grpc, metrics = port_number(c, "grpc"), port_number(c, "metrics")
                for rule in spec["ingress"]:
                    ports = {p["port"] for p in rule["ports"]}
                    self.assertTrue(ports <= {grpc, metrics})
                    if grpc in ports:
                        peers = rule["from"]
                        self.assertEqual(peers, [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}])

    def test_verifier_security_context(self):
        for sandbox, case in [("landlock", "defaults"), ("bubblewrap", "everything-on")]:
            verifier = self.rendered[case].component("verifier")
            pod = verifier["spec"]["template"]["spec"]
            c = container(verifier)
            sc = c["securityContext"]
            with self.subTest(sandbox=sandbox):
                self.assertTrue(pod["securityContext"]["runAsNonRoot"])
                self.assertGreater(pod["securityContext"]["runAsUser"], 0)
                self.assertFalse(sc["allowPrivilegeEscalation"])
                self.assertEqual(sc["capabilities"], {"drop": ["ALL"]})
                self.assertNotIn("privileged", sc)
                self.assertTrue(sc["readOnlyRootFilesystem"])
                self.assertFalse(pod["automountServiceAccountToken"])
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                self.assertEqual(mounts, {"/tmp"})
                self.assertEqual(c["args"][:2], ["verifier", "serve"])
                if sandbox == "landlock":
                    # the restricted Pod Security profile
                    self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
                    self.assertNotIn("hostUsers", pod)
                    self.assertNotIn("procMount", sc)
                else:
                    # what bubblewrap needs (docs/verifier.md), and only that
                    self.assertIs(pod["hostUsers"], False)
                    self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "Unconfined"})
                    self.assertEqual(pod["securityContext"]["appArmorProfile"], {"type": "Unconfined"})
                    self.assertEqual(sc["procMount"], "Unmasked")

    def test_nothing_runs_as_root(self):
        for case, rendered in self.rendered.items():
            for w in rendered.workloads():
                pod = w["spec"]["template"]["spec"]
                with self.subTest(case=case, workload=w["metadata"]["name"]):
                    self.assertTrue(pod["securityContext"]["runAsNonRoot"])
                    self.assertGreater(pod["securityContext"]["runAsUser"], 0)
                    sc = container(w)["securityContext"]
                    self.assertFalse(sc["allowPrivilegeEscalation"])
                    self.assertNotEqual(sc.get("runAsUser"), 0)
                    self.assertNotEqual(sc.get("runAsNonRoot"), False)
                    self.assertNotIn("privileged", sc)
                    self.assertNotIn("add", sc["capabilities"])

    # --- token ------------------------------------------------------------------------------

    def check_token(self, rendered: Rendered, secret_name: str, key: str):
        for w in rendered.workloads():
            c = container(w)
            with self.subTest(workload=w["metadata"]["name"]):
                self.assertIn(c["args"][0], PRIME_SUBCOMMANDS)
                ref = env_of(c)["PRIME_TOKEN"]["valueFrom"]["secretKeyRef"]
                self.assertEqual(ref, {"name": secret_name, "key": key})
                self.assertNotIn("--token", c["args"])

    def test_token_comes_from_the_secret(self):
        token = "s3cret-Token-Value"
        rendered = Rendered({"auth": {"token": token}, "prmServer": {"enabled": True}}, self.chart)
        secret = rendered.one("Secret")
        self.assertEqual(base64.b64decode(secret["data"]["token"]).decode(), token)
        self.check_token(rendered, secret["metadata"]["name"], "token")
        # the token itself appears nowhere but in the Secret
        for path, text in rendered.manifests.items():
            if not path.endswith("secret.yaml"):
                self.assertNotIn(token, text, path)
                self.assertNotIn(base64.b64encode(token.encode()).decode(), text, path)

    def test_generated_token(self):
        a = Rendered(None, self.chart).one("Secret")["data"]["token"]
        b = Rendered(None, self.chart).one("Secret")["data"]["token"]
        self.assertNotEqual(a, b)
        self.assertGreaterEqual(len(base64.b64decode(a)), 32)

    def test_existing_secret(self):
        rendered = Rendered({"auth": {"existingSecret": "team-token", "tokenKey": "prime"}}, self.chart)
        self.assertEqual(rendered.all("Secret"), [])
        self.check_token(rendered, "team-token", "prime")

    # --- wiring, probes, metrics --------------------------------------------------------------

    @staticmethod
    def controller_labels(sts: dict, ordinal: int) -> dict:
        """Labels the StatefulSet controller adds to the pod with this ordinal."""
        return {
            "statefulset.kubernetes.io/pod-name": f"{sts['metadata']['name']}-{ordinal}",
            "apps.kubernetes.io/pod-index": str(ordinal),
        }

    def test_actors_reach_rank_0_and_the_verifier(self):
        for case in ["defaults", "multi-node"]:
            rendered = self.rendered[case]
            actor = rendered.component("actor")
            c = container(actor)
            args = c["args"]
            self.assertEqual(args[0], "actor")
            self.assertEqual(actor["spec"]["replicas"], rendered.values["actors"]["replicas"])
            for url_flag, component in [("--learner", "learner"), ("--verifier", "verifier")]:
                url = urlparse(flag(args, url_flag))
                self.assertEqual(url.scheme, "http")
                service = rendered.one("Service", url.hostname)
                target = rendered.component(component)
                pod_labels = dict(target["spec"]["template"]["metadata"]["labels"])
                if component == "learner":
                    pod_labels.update(self.controller_labels(target, 0))
                self.assertTrue(selects(service["spec"]["selector"], pod_labels))
                port = [p for p in service["spec"]["ports"] if p["port"] == url.port]
                self.assertEqual(len(port), 1)
                self.assertEqual(port[0]["targetPort"], "grpc")
            # the learner Service sends actors to rank 0 only: the ranks above serve no actors
            learner_service = rendered.one("Service", urlparse(flag(args, "--learner")).hostname)
            sts = rendered.one("StatefulSet")
            template_labels = sts["spec"]["template"]["metadata"]["labels"]
            for ordinal in range(sts["spec"]["replicas"]):
                labels = {**template_labels, **self.controller_labels(sts, ordinal)}
                self.assertEqual(selects(learner_service["spec"]["selector"], labels), ordinal == 0)
            # the tokenizer is read from the mounted models
            models = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["models"]
            self.assertTrue(flag(args, "--tokenizer").startswith(models + "/"))
        self.assertEqual(self.rendered["multi-node"].component("actor")["spec"]["replicas"], 16)

    def test_autoscaler(self):
        rendered = self.rendered["everything-on"]
        hpa = rendered.one("HorizontalPodAutoscaler")
        actor = rendered.component("actor")
        self.assertEqual(hpa["spec"]["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "Deployment", "name": actor["metadata"]["name"]})
        self.assertEqual((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]), (4, 32))
        # the HPA owns the replica count: the Deployment leaves it out so upgrades don't reset it
        self.assertNotIn("replicas", actor["spec"])
        # its metric is one the learner exports
        metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
        self.assertIn(f'"{metric.removeprefix("prime_learner_")}"', (REPO / "learner/src/service.rs").read_text())
        self.assertEqual(self.rendered["defaults"].all("HorizontalPodAutoscaler"), [])

    def test_grpc_health_probes(self):
        proto_services = set()
        for proto in (REPO / "proto").rglob("*.proto"):
            text = proto.read_text()
            package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
            proto_services |= {f"{package}.{s}" for s in re.findall(r"^service\s+(\w+)", text, re.M)}
        rendered = self.rendered["everything-on"]
        for component in ["learner", "verifier", "prm-server"]:
            c = container(rendered.component(component))
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
                with self.subTest(component=component, probe=probe):
                    grpc = c[probe]["grpc"]
                    self.assertEqual(grpc["port"], port_number(c, "grpc"))
                    self.assertIn(grpc["service"], proto_services)
                    self.assertEqual(listen_port(flag(c["args"], "--listen")), grpc["port"])

    def test_metrics_are_scraped(self):
        rendered = self.rendered["everything-on"]
        for component in ["learner", "verifier", "prm-server"]:
            w = rendered.component(component)
            c = container(w)
            annotations = w["spec"]["template"]["metadata"]["annotations"]
            with self.subTest(component=component):
                self.assertEqual(annotations["prometheus.io/scrape"], "true")
                port = int(annotations["prometheus.io/port"])
                self.assertEqual(port, port_number(c, "metrics"))
                self.assertEqual(port, listen_port(flag(c["args"], "--metrics-listen")))
        monitor = rendered.one("ServiceMonitor")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(monitor["metadata"]["labels"]["release"], "prom")
        scraped = [
            s for s in rendered.all("Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            and any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])
        ]
        self.assertEqual(
            {s["metadata"]["name"] for s in scraped},
            {f"{RELEASE}-prime-learner", f"{RELEASE}-prime-verifier", f"{RELEASE}-prime-prm-server"},
        )

    def test_docs_set_flags_are_valid(self):
        """Every `--set` in docs/deploy.md parses as Helm parses it and passes the schema."""
        docs = (REPO / "docs" / "deploy.md").read_text()
        expressions = [
            m.strip("'") for m in re.findall(r"--set ('[^']*'|[^\s`]+)", docs) if m != "KEY=VALUE"
        ]
        self.assertGreaterEqual(len(expressions), 5)
        for expression in expressions:
            with self.subTest(expression=expression):
                Rendered(deep_merge(example_values(), helm.parse_set_string(expression)), self.chart)

    def test_notes_tell_how_to_watch(self):
        notes = self.rendered["defaults"].manifests["prime/templates/NOTES.txt"]
        self.assertIn(f"exec {RELEASE}-prime-learner-0 -- prime status --addr http://127.0.0.1:50051", notes)
        self.assertIn(f"get secret {RELEASE}-prime-auth", notes)

    # --- the chart against the real binary -----------------------------------------------------

    def test_commands_and_flags_exist_in_the_binary(self):
        """Every subcommand and flag the chart passes is one `prime` has (its --help)."""
        binary = os.environ.get("PRIME_BIN") or next(
            (str(p) for p in [REPO / "target/debug/prime", REPO / "target/release/prime"] if p.exists()),
            None,
        )
        if binary is None:
            self.skipTest("no prime binary built yet (make test builds it before this test)")
        used: dict[tuple[str, ...], set[str]] = {}
        envs: dict[tuple[str, ...], set[str]] = {}
        for rendered in self.rendered.values():
            for w in rendered.workloads():
                c = container(w)
                args = c["args"]
                command = tuple(a for a in args[:2] if not a.startswith("-"))
                if command == ("verifier",):
                    raise AssertionError("`prime verifier` needs the serve subcommand")
                used.setdefault(command, set()).update(a for a in args if a.startswith("--"))
                envs.setdefault(command, set()).update(env_of(c))
        for command, flags in sorted(used.items()):
            with self.subTest(command=" ".join(command)):
                result = subprocess.run([binary, *command, "--help"], capture_output=True, text=True)
                if result.returncode != 0 and command[0] in PENDING_SUBCOMMANDS:
                    print(f"\n  not in the binary yet: prime {' '.join(command)}: {PENDING_SUBCOMMANDS[command[0]]}")
                    continue
                self.assertEqual(result.returncode, 0, result.stderr)
                known = set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))
                self.assertEqual(flags - known, set(), f"flags prime {' '.join(command)} does not have")
                if "PRIME_TOKEN" in envs[command]:
                    self.assertIn("PRIME_TOKEN", result.stdout)


if __name__ == "__main__":
    unittest.main()
