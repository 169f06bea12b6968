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
import shutil
import socket
import subprocess
import tempfile
import time
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
TLS_EXAMPLE = CHART / "examples" / "tls.yaml"
CERT_MANAGER_EXAMPLE = CHART / "examples" / "cert-manager.yaml"
RELEASE = "run1"
NAMESPACE = "train"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ["1.30", "1.37"]
# Kinds from CRDs, which have no upstream schema: checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Every long-running role starts the same way: `prime ROLE VERB`.
ROLE_COMMANDS = {("learner", "serve"), ("actor", "run"), ("verifier", "serve"), ("prm-server", "serve")}


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
    values["actors"]["kvCacheGib"] = 40.5
    values["learner"]["overrides"] = ["learner.steps=100", "learner.algo.prm.beta=0.1"]
    values["learner"]["extraEnv"] = {"NCCL_IB_HCA": "mlx5", "NCCL_NET_GDR_LEVEL": 2}
    return values


TLS_SECRET = "eurus-prime-tls"
TLS_DIR = "/etc/prime-tls"


def tls_on(mutual: bool = False) -> dict:
    """TLS on the default values plus the PRM server; with `mutual`, the actors present the
    servers' certificate."""
    return {
        "tls": {"enabled": True, "secretName": TLS_SECRET, "mutual": mutual},
        "prmServer": {"enabled": True},
    }


def mutual_tls() -> dict:
    """examples/tls.yaml (mutual TLS, the actors with their own certificate) on top of every
    option, the PRM server included."""
    return deep_merge(everything_on(), helm.values_from_yaml(TLS_EXAMPLE.read_text()))


WEIGHTS_PORT = 29700


def weight_broadcast_on() -> dict:
    """The multi-node example with the weight broadcast over NCCL on a port of its own, and
    the actors on the learner's fabric."""
    return deep_merge(example_values(), {
        "learner": {"weightBroadcast": {"enabled": True, "port": WEIGHTS_PORT, "backend": "nccl"}},
        "actors": {"ncclEnv": {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN"}},
    })


# Keys of the flat [learner] table that moved into its sub-tables (issue 17,
# docs/configuration.md "Moved keys"); the learner refuses them.
MOVED_LEARNER_KEYS = {
    "estimator", "mini_batches", "prm_update", "reference", "prm", "advantage", "ppo", "filter",
    "batch_prompts", "samples_per_prompt", "oversample", "max_response_tokens", "temperature",
    "top_p", "top_k", "max_staleness", "lease_seconds",
    "train_files", "heldout_files", "max_prompt_tokens",
    "eval_every", "eval_problems", "eval_samples", "eval_temperature", "eval_greedy",
    "checkpoint_every", "keep_checkpoints",
    "micro_batch_tokens", "logit_chunk_tokens", "recompute_activations", "master_weights", "param_dtype",
}


def toml_override(table: dict, assignment: str) -> None:
    """`--set key.path=value` applied as the learner applies it (learner/src/config.rs,
    apply_override): the value read as TOML, or as a string when it is not TOML."""
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, last = key.strip().split(".")
    for part in parents:
        table = table.setdefault(part, {})
    table[last] = value


CASES = {
    "defaults": lambda: None,
    "multi-node": example_values,
    "everything-on": everything_on,
    "cpu-only": lambda: {
        "learner": {"gpus": 0},
        "actors": {"gpus": 0},
        "prmServer": {"enabled": True, "gpus": 0},
    },
    "tls": tls_on,
    "mutual-tls": mutual_tls,
    "weight-broadcast": weight_broadcast_on,
    "learner-job": lambda: deep_merge(example_values(), {"learner": {"workload": "Job"}}),
}
TLS_CASES = ["tls", "mutual-tls"]
# The TLS variables in a server container that its exec probes' `prime status` reads.
PROBE_TLS_ENV = {"PRIME_TLS_CA", "PRIME_TLS_DOMAIN", "PRIME_TLS_CLIENT_CERT", "PRIME_TLS_CLIENT_KEY"}
# The servers that speak TLS when it is on.
TLS_SERVERS = ["learner", "verifier", "prm-server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(secrets: Path, servers: str, names: list[str], client: str | None) -> None:
    """The Secrets' files, as a cert-manager CA Issuer writes them (tls.crt, tls.key, ca.crt)
    for examples/cert-manager.yaml: one CA; under `servers`, a certificate for `names` with
    server and client auth; under `client`, a client-auth-only certificate with no names."""
    ca = secrets / "ca"
    ca.mkdir(parents=True)
    openssl = lambda cwd, *args: subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(ca, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=prime-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    leaves = [(servers, "serverAuth,clientAuth", "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")]
    if client:
        leaves.append((client, "clientAuth", ""))
    for secret, usages, names_line in leaves:
        directory = secrets / secret
        directory.mkdir()
        openssl(directory, "req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={secret}")
        (directory / "leaf.ext").write_text(
            f"{names_line}extendedKeyUsage={usages}\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        )
        openssl(directory, "x509", "-req", "-in", "tls.csr", "-CA", "../ca/ca.crt", "-CAkey", "../ca/ca.key",
                "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "leaf.ext")
        shutil.copy(ca / "ca.crt", directory / "ca.crt")


def check_tls_live(test: unittest.TestCase, binary: str, rendered: "Rendered", tmp: Path) -> None:
    """Runs the rendered verifier and its probes on loopback (see test_tls_against_the_real_binary)."""
    secrets = tmp / "secrets"
    tls = rendered.values["tls"]
    make_certificates(secrets, tls["secretName"], tls_dns_names(rendered), tls.get("clientSecretName") or None)
    mutual = tls["mutual"]

    def env_for(workload: dict) -> dict[str, str]:
        # the kubelet's view: values as given, files from the mounted Secret, the token from its Secret
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
        env["RUST_BACKTRACE"] = "0"
        for e in container(workload).get("env", []):
            if "value" in e:
                value = e["value"]
                if value.startswith(TLS_DIR + "/"):
                    secret, key = secret_file(workload, value)
                    value = str(secrets / secret / key)
                env[e["name"]] = value
            elif "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                data = rendered.one("Secret", ref["name"])["data"][ref["key"]]
                env[e["name"]] = base64.b64decode(data).decode()
        return env

    verifier = rendered.component("verifier")
    c = container(verifier)
    server_env = env_for(verifier)
    port = free_port()
    args = list(c["args"])
    args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
    at = args.index("--metrics-listen")
    del args[at:at + 2]
    log = open(tmp / "verifier.log", "wb")
    server = subprocess.Popen([binary, *args], env=server_env, stdout=log, stderr=subprocess.STDOUT)

    def status(env: dict[str, str], command: list[str] | None = None, timeout: float = 30):
        command = command or ["prime", "status", "--addr", f"https://127.0.0.1:{port}"]
        return subprocess.run([binary, *command[1:]], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        probes = {p: c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        for name, probe in probes.items():
            command = list(probe["exec"]["command"])
            at = command.index("--addr") + 1
            test.assertEqual(command[at], f"https://127.0.0.1:{port_number(c, 'grpc')}")
            command[at] = f"https://127.0.0.1:{port}"
            # as the kubelet does: the start-up probe is retried until it passes
            deadline = time.monotonic() + 60
            while True:
                result = status(server_env, command, timeout=probe["timeoutSeconds"] + 20)
                if result.returncode == 0 or name != "startupProbe" or time.monotonic() > deadline:
                    break
                test.assertIsNone(server.poll(), (tmp / "verifier.log").read_text())
                time.sleep(0.5)
            test.assertEqual(result.returncode, 0, f"{name}: {result.stderr}\n{(tmp / 'verifier.log').read_text()}")
            test.assertIn("verifier", result.stdout)

        # the actors' material, dialing the Service name of their --verifier URL
        actor = rendered.component("actor")
        host = urlparse(flag(container(actor)["args"], "--verifier")).hostname
        actor_env = {**env_for(actor), "PRIME_TLS_DOMAIN": host}
        result = status(actor_env)
        test.assertEqual(result.returncode, 0, result.stderr)

        # and what must fail does: another name, plain gRPC, no client certificate
        result = status({**server_env, "PRIME_TLS_DOMAIN": "elsewhere.example"})
        test.assertNotEqual(result.returncode, 0)
        test.assertIn("elsewhere.example", result.stderr)
        plain = {k: v for k, v in server_env.items() if not k.startswith("PRIME_TLS_")}
        test.assertNotEqual(status(plain, ["prime", "status", "--addr", f"http://127.0.0.1:{port}"]).returncode, 0)
        anonymous = {k: v for k, v in actor_env.items() if not k.startswith("PRIME_TLS_CLIENT_")}
        test.assertEqual(status(anonymous).returncode == 0, not mutual)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


class Rendered:
    """One rendering of the chart: every object, by (kind, name)."""

    def __init__(self, values: dict | None, chart: helm.Chart, name: str = RELEASE, namespace: str = NAMESPACE):
        self.values = chart.merge_values(values)
        self.manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
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
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]

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


def secret_file(workload: dict, path: str) -> tuple[str, str]:
    """The (Secret, key) a file path in the workload's container comes from, through its
    mounts and projected or secret volumes; the mount must be read-only."""
    c = container(workload)
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for mount in c.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        assert mount.get("readOnly") is True, f"{mount['name']} is mounted writable"
        relative = path[len(prefix):]
        volume = volumes[mount["name"]]
        if "secret" in volume:
            sources = [{"secret": {**volume["secret"], "name": volume["secret"]["secretName"]}}]
        else:
            sources = volume["projected"]["sources"]
        found = [
            (source["secret"]["name"], item["key"])
            for source in sources
            if "secret" in source
            for item in source["secret"]["items"]
            if item["path"] == relative
        ]
        assert len(found) == 1, f"{path}: {found}"
        return found[0]
    raise AssertionError(f"{path} is on no volume of {workload['metadata']['name']}")


def secret_keys(workload: dict, secret: str) -> set[str]:
    """Every key of `secret` that the workload's volumes hold ("*" for a whole-Secret volume)."""
    keys = set()
    for volume in workload["spec"]["template"]["spec"]["volumes"]:
        for source in volume.get("projected", {}).get("sources", []):
            if source.get("secret", {}).get("name") == secret:
                keys |= {item["key"] for item in source["secret"]["items"]}
        if volume.get("secret", {}).get("secretName") == secret:
            keys.add("*")
    return keys


def tls_dns_names(rendered: "Rendered") -> list[str]:
    """The DNS names NOTES.txt says the certificate must carry."""
    notes = rendered.manifests["prime/templates/NOTES.txt"]
    block = notes.split("must carry these DNS names:\n", 1)[1]
    names = []
    for line in block.splitlines():
        if not line.startswith("  "):
            break
        names.append(line.strip())
    return names


def prime_binary() -> str | None:
    return os.environ.get("PRIME_BIN") or next(
        (str(p) for p in [REPO / "target/debug/prime", REPO / "target/release/prime"] if p.exists()),
        None,
    )


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
        for case, make in [("defaults", lambda: None), ("multi-node", example_values), ("mutual-tls", mutual_tls)]:
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
            "TLS without a Secret": ({"tls": {"enabled": True}}, "/tls"),
            "TLS with an empty Secret name": ({"tls": {"enabled": True, "secretName": ""}}, "/tls/secretName"),
            "client certificate without mutual TLS": (
                {"tls": {"enabled": True, "secretName": TLS_SECRET, "clientSecretName": "actor-tls"}},
                "/tls/mutual",
            ),
            "misspelt TLS key": ({"tls": {"enabled": True, "secretName": TLS_SECRET, "mTLS": True}}, "mTLS"),
            "probe timeout of zero": ({"tls": {"probeTimeoutSeconds": 0}}, "/tls/probeTimeoutSeconds"),
            "weights port out of range": (
                {"learner": {"weightBroadcast": {"enabled": True, "port": 70000}}},
                "/learner/weightBroadcast/port",
            ),
            "weights port as a string": (
                {"learner": {"weightBroadcast": {"port": "29600"}}},
                "/learner/weightBroadcast/port",
            ),
            "weights port zero (ephemeral: unreachable through a Service)": (
                {"learner": {"weightBroadcast": {"enabled": True, "port": 0}}},
                "/learner/weightBroadcast/port",
            ),
            "weight broadcast enabled as a string": (
                {"learner": {"weightBroadcast": {"enabled": "yes"}}},
                "/learner/weightBroadcast/enabled",
            ),
            "unknown broadcast backend": (
                {"learner": {"weightBroadcast": {"backend": "udp"}}},
                "/learner/weightBroadcast/backend",
            ),
            "misspelt broadcast key": ({"learner": {"weightBroadcast": {"prot": 1}}}, "prot"),
            "actor NCCL env as a list": ({"actors": {"ncclEnv": ["NCCL_DEBUG=WARN"]}}, "/actors/ncclEnv"),
            "KV cache budget of zero": ({"actors": {"kvCacheGib": 0}}, "/actors/kvCacheGib"),
            "KV cache budget as a string": ({"actors": {"kvCacheGib": "40Gi"}}, "/actors/kvCacheGib"),
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
        self.assertEqual(args[:2], ["learner", "serve"])
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
        self.assertEqual(sets, ["learner.steps=100", "learner.algo.prm.beta=0.1"])

    def test_learner_extra_args_follow_the_flags(self):
        # e.g. --force: start a rank the memory plan says does not fit its GPU
        args = container(Rendered({"learner": {"extraArgs": ["--force"]}}, self.chart).one("StatefulSet"))["args"]
        self.assertEqual(args[-1], "--force")
        self.assertNotIn("--force", container(self.rendered["defaults"].one("StatefulSet"))["args"])

    def test_config_map_is_the_paper_run(self):
        # the default run config is configs/eurus-2-7b.toml, key for key
        config_map = self.rendered["defaults"].one("ConfigMap")
        rendered = tomllib.loads(config_map["data"]["config.toml"])
        reference = tomllib.loads((REPO / "configs" / "eurus-2-7b.toml").read_text())
        self.assertEqual(rendered, reference)
        # and its paths are where the chart mounts the models and the data
        values = self.rendered["defaults"].values
        self.assertTrue(rendered["model"]["path"].startswith(values["models"]["mountPath"] + "/"))
        data = rendered["learner"]["data"]
        for path in data["train_files"] + data["heldout_files"]:
            self.assertTrue(path.startswith(values["data"]["mountPath"] + "/"))

    def test_run_config_uses_the_learner_tables(self):
        # the learner refuses the flat keys of the old [learner] table (issue 17), so no
        # rendering may carry one
        for case, rendered in self.rendered.items():
            with self.subTest(case=case):
                learner = tomllib.loads(rendered.one("ConfigMap")["data"]["config.toml"])["learner"]
                self.assertEqual(set(learner) & MOVED_LEARNER_KEYS, set())
                self.assertEqual(learner["algo"]["estimator"], "prime")
        # overrides with the new paths pass the schema and land in their tables, beside the
        # run config's other keys there
        overrides = ["learner.algo.estimator=rloo", "learner.eval.every=8", "learner.rollout.temperature=0.9"]
        args = container(Rendered({"learner": {"overrides": overrides}}, self.chart).one("StatefulSet"))["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        self.assertEqual(sets, overrides)
        config = tomllib.loads(self.rendered["defaults"].one("ConfigMap")["data"]["config.toml"])
        for assignment in sets:
            toml_override(config, assignment)
        learner = config["learner"]
        self.assertEqual(learner["algo"]["estimator"], "rloo")
        self.assertEqual(learner["algo"]["mini_batches"], 4)
        self.assertEqual(learner["eval"]["every"], 8)
        self.assertEqual(learner["eval"]["problems"], 1024)
        self.assertEqual(learner["rollout"]["temperature"], 0.9)
        self.assertEqual(set(learner) & MOVED_LEARNER_KEYS, set())

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
                self.assertIn(tuple(c["args"][:2]), ROLE_COMMANDS)
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
    def pod_failure_action(job: dict, exit_code: int, container_name: str = "learner") -> str:
        """What the Job controller does with a pod whose container exited with `exit_code`
        (the rules in order, the first match wins; no match counts towards backoffLimit)."""
        for rule in job["spec"]["podFailurePolicy"]["rules"]:
            on = rule.get("onExitCodes")
            if on is None or on.get("containerName", container_name) != container_name:
                continue
            hit = exit_code in on["values"]
            if hit == (on["operator"] == "In"):
                return rule["action"]
        return "Count"

    def test_actors_route_data_sources_to_their_verifiers(self):
        routes = {"keyword_task": "http://my-reward:50060", "judge": "https://judge.example:443"}
        args = container(Rendered({"actors": {"verifierRoutes": routes}}, self.chart).component("actor"))["args"]
        given = sorted(args[i + 1] for i, a in enumerate(args) if a == "--verifier-route")
        self.assertEqual(given, sorted(f"{k}={v}" for k, v in routes.items()))
        self.assertNotIn("--verifier-route", container(self.rendered["defaults"].component("actor"))["args"])
        with self.assertRaises(Exception) as raised:
            Rendered({"actors": {"verifierRoutes": {"x": "my-reward:50060"}}}, self.chart)
        self.assertIn("verifierRoutes", str(raised.exception))

    def test_learner_as_a_job_reads_the_exit_status(self):
        rendered = self.rendered["learner-job"]
        self.assertEqual(rendered.all("StatefulSet"), [])
        job = rendered.one("Job")
        spec, pod = job["spec"], job["spec"]["template"]
        world = rendered.values["learner"]["replicas"]
        self.assertGreater(world, 1)
        self.assertEqual((spec["completionMode"], spec["completions"], spec["parallelism"]), ("Indexed", world, world))
        self.assertEqual(pod["spec"]["restartPolicy"], "Never")
        c = container(job)
        self.assertEqual(c["args"][:2], ["learner", "serve"])
        env = env_of(c)
        # rank = completion index; rank 0's DNS name is <job>-0 under the headless Service
        self.assertEqual(env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.labels['batch.kubernetes.io/job-completion-index']")
        headless = rendered.one("Service", pod["spec"]["subdomain"])
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertTrue(selects(headless["spec"]["selector"], pod["metadata"]["labels"]))
        self.assertEqual(env["MASTER_ADDR"]["value"], f"{job['metadata']['name']}-0.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local")
        # the exit statuses of docs/reliability.md
        self.assertEqual(self.pod_failure_action(job, 2), "FailJob")
        self.assertEqual(self.pod_failure_action(job, 75), "Ignore")
        self.assertEqual(self.pod_failure_action(job, 1), "Count")
        self.assertEqual(self.pod_failure_action(job, 70), "Count")
        self.assertEqual(spec["backoffLimit"], rendered.values["learner"]["job"]["backoffLimit"])
        notes = rendered.manifests["prime/templates/NOTES.txt"]
        self.assertIn(f"Job {job['metadata']['name']}", notes)
        self.assertIn(f"batch.kubernetes.io/job-name={job['metadata']['name']},batch.kubernetes.io/job-completion-index=0", notes)
        disruption = [r for r in spec["podFailurePolicy"]["rules"] if "onPodConditions" in r]
        self.assertEqual([(r["action"], r["onPodConditions"][0]["type"]) for r in disruption], [("Ignore", "DisruptionTarget")])
        # ... and the real binary exits with them: a config it refuses, a peer that is down
        binary = prime_binary()
        if binary is None:
            self.skipTest("no prime binary built yet (make test builds it before this test)")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIME_", "RANK", "WORLD_SIZE", "MASTER_"))}
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.toml"
            config.write_text("[learner]\nno_such_key = 1\n")
            bad = subprocess.run([binary, "learner", "serve", "--config", str(config), "--run-dir", f"{tmp}/run"],
                                 env=env, capture_output=True, text=True, timeout=120)
            self.assertEqual(self.pod_failure_action(job, bad.returncode), "FailJob", bad.stderr)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        down = subprocess.run([binary, "status", "--addr", f"http://127.0.0.1:{closed}", "--timeout-secs", "2"],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(self.pod_failure_action(job, down.returncode), "Ignore", down.stderr)

    @staticmethod
    def controller_labels(sts: dict, ordinal: int) -> dict:
        """Labels the StatefulSet controller adds to the pod with this ordinal."""
        return {
            "statefulset.kubernetes.io/pod-name": f"{sts['metadata']['name']}-{ordinal}",
            "apps.kubernetes.io/pod-index": str(ordinal),
        }

    @staticmethod
    def service_of(url) -> str:
        """The Service a URL's host names: its own name, or the first label of
        <service>.<namespace>.svc.cluster.local."""
        service, _, domain = url.hostname.partition(".")
        assert domain in ("", f"{NAMESPACE}.svc.cluster.local"), url.hostname
        return service

    def test_actors_reach_rank_0_and_the_verifier(self):
        for case in ["defaults", "multi-node", "tls", "mutual-tls"]:
            rendered = self.rendered[case]
            actor = rendered.component("actor")
            c = container(actor)
            args = c["args"]
            self.assertEqual(args[:2], ["actor", "run"])
            if not rendered.values["actors"]["autoscaling"]["enabled"]:
                self.assertEqual(actor["spec"]["replicas"], rendered.values["actors"]["replicas"])
            for url_flag, component in [("--learner", "learner"), ("--verifier", "verifier")]:
                url = urlparse(flag(args, url_flag))
                if case in TLS_CASES:
                    # https, to a name the certificate carries
                    self.assertEqual(url.scheme, "https")
                    self.assertIn(url.hostname, tls_dns_names(rendered))
                else:
                    self.assertEqual(url.scheme, "http")
                service = rendered.one("Service", self.service_of(url))
                target = rendered.component(component)
                pod_labels = dict(target["spec"]["template"]["metadata"]["labels"])
                if component == "learner":
                    pod_labels.update(self.controller_labels(target, 0))
                self.assertTrue(selects(service["spec"]["selector"], pod_labels))
                port = [p for p in service["spec"]["ports"] if p["port"] == url.port]
                self.assertEqual(len(port), 1)
                self.assertEqual(port[0]["targetPort"], "grpc")
            # the learner Service sends actors to rank 0 only: the ranks above serve no actors
            learner_service = rendered.one("Service", self.service_of(urlparse(flag(args, "--learner"))))
            sts = rendered.one("StatefulSet")
            template_labels = sts["spec"]["template"]["metadata"]["labels"]
            for ordinal in range(sts["spec"]["replicas"]):
                labels = {**template_labels, **self.controller_labels(sts, ordinal)}
                self.assertEqual(selects(learner_service["spec"]["selector"], labels), ordinal == 0)
            # the tokenizer is read from the mounted models
            models = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["models"]
            self.assertTrue(flag(args, "--tokenizer").startswith(models + "/"))
        self.assertEqual(self.rendered["multi-node"].component("actor")["spec"]["replicas"], 16)

    def test_actor_kv_cache_budget(self):
        # unset by default: the actor takes its share of the free GPU memory
        for case in ["defaults", "multi-node"]:
            self.assertNotIn("--kv-cache-gib", container(self.rendered[case].component("actor"))["args"])
        args = container(self.rendered["everything-on"].component("actor"))["args"]
        self.assertEqual(float(flag(args, "--kv-cache-gib")), 40.5)
        whole = Rendered({"actors": {"kvCacheGib": 60}}, self.chart)
        self.assertEqual(flag(container(whole.component("actor"))["args"], "--kv-cache-gib"), "60")

    def test_autoscaler(self):
        rendered = self.rendered["everything-on"]
        hpa = rendered.one("HorizontalPodAutoscaler")
        actor = rendered.component("actor")
        self.assertEqual(hpa["spec"]["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "Deployment", "name": actor["metadata"]["name"]})
        self.assertEqual((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]), (4, 32))
        # the HPA owns the replica count: the Deployment leaves it out so upgrades don't reset it
        self.assertNotIn("replicas", actor["spec"])
        # its metric is the learner's backlog gauge, exported and documented under that name
        metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
        self.assertEqual(metric, "prime_learner_work_backlog")
        self.assertIn(f'"{metric}"', (REPO / "learner/src/service.rs").read_text())
        self.assertIn(f"| `{metric}` | gauge |", (REPO / "docs/metrics.md").read_text())
        # a backlog is what no actor holds yet: the count scales by backlog / target
        self.assertEqual(hpa["spec"]["metrics"][0]["external"]["target"]["type"], "Value")
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

    def test_actor_http_probes(self):
        for case in ["defaults", "everything-on"]:
            c = container(self.rendered[case].component("actor"))
            port = port_number(c, "metrics")
            self.assertEqual(listen_port(flag(c["args"], "--metrics-listen")), port)
            for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
                with self.subTest(case=case, probe=probe):
                    self.assertEqual(c[probe]["httpGet"], {"path": path, "port": port})
                    self.assertNotIn("grpc", c[probe])
                    timing = self.rendered[case].values["actors"][probe]
                    self.assertEqual(c[probe]["periodSeconds"], timing["periodSeconds"])
                    self.assertEqual(c[probe]["failureThreshold"], timing["failureThreshold"])
        # the paths are the ones the actor serves
        self.assertIn('"/readyz"', (REPO / "proto/src/metrics.rs").read_text())
        self.assertIn('"/healthz"', (REPO / "proto/src/metrics.rs").read_text())
        moved = Rendered({"actors": {"metricsPort": 9200}}, self.chart)
        c = container(moved.component("actor"))
        self.assertEqual(c["readinessProbe"]["httpGet"]["port"], 9200)
        self.assertEqual(flag(c["args"], "--metrics-listen"), "0.0.0.0:9200")

    def test_metrics_are_scraped(self):
        rendered = self.rendered["everything-on"]
        for component in ["learner", "actor", "verifier", "prm-server"]:
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
            {f"{RELEASE}-prime-learner", f"{RELEASE}-prime-actor", f"{RELEASE}-prime-verifier", f"{RELEASE}-prime-prm-server"},
        )
        # the actors' Service is headless and lists actors that are not ready (fetching weights)
        actors = rendered.one("Service", f"{RELEASE}-prime-actor")
        self.assertEqual(actors["spec"]["clusterIP"], "None")
        self.assertTrue(actors["spec"]["publishNotReadyAddresses"])
        self.assertTrue(selects(actors["spec"]["selector"], rendered.component("actor")["spec"]["template"]["metadata"]["labels"]))

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

    # --- weight broadcast -----------------------------------------------------------------------

    def test_weight_broadcast_is_off_by_default(self):
        for case in ["defaults", "multi-node", "everything-on", "cpu-only", "tls", "mutual-tls"]:
            rendered = self.rendered[case]
            with self.subTest(case=case):
                for w in rendered.workloads():
                    c = container(w)
                    self.assertNotIn("weights", [p["name"] for p in c.get("ports", [])])
                    self.assertFalse([a for a in c["args"] if "weight_broadcast" in a])
                    self.assertNotIn("--no-weight-broadcast", c["args"])
                for service in rendered.all("Service"):
                    self.assertNotIn("weights", [p["name"] for p in service["spec"]["ports"]])
                self.assertFalse([n for n in env_of(container(rendered.component("actor"))) if n.startswith("NCCL_")])
        # off renders exactly what the chart rendered before the broadcast existed, whatever
        # the other broadcast values say (the Secret's token is drawn anew on each render)
        without_secret = lambda r: [o for o in r.objects if o["kind"] != "Secret"]
        off = Rendered(
            {"learner": {"weightBroadcast": {"enabled": False, "port": 31000, "backend": "tcp"}}, "actors": {"ncclEnv": {}}},
            self.chart,
        )
        self.assertEqual(without_secret(off), without_secret(self.rendered["defaults"]))

    def test_weight_broadcast_flags_ports_and_service(self):
        rendered = self.rendered["weight-broadcast"]
        sts = rendered.one("StatefulSet")
        c = container(sts)
        args = c["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        self.assertEqual(sets, [
            "learner.weight_broadcast.enabled=true",
            f"learner.weight_broadcast.port={WEIGHTS_PORT}",
            "learner.weight_broadcast.backend=nccl",
        ])
        # what the learner reads: the run config with the --set values laid over it, typed
        config = tomllib.loads(rendered.one("ConfigMap")["data"][Path(flag(args, "--config")).name])
        for assignment in sets:
            toml_override(config, assignment)
        broadcast = config["learner"]["weight_broadcast"]
        self.assertEqual(broadcast, {"enabled": True, "port": WEIGHTS_PORT, "backend": "nccl"})
        self.assertIs(broadcast["enabled"], True)
        self.assertIsInstance(broadcast["port"], int)
        # the learner binds the port on its --listen IP: every interface of the pod
        self.assertEqual(flag(args, "--listen").rsplit(":", 1)[0], "0.0.0.0")
        self.assertEqual(port_number(c, "weights"), WEIGHTS_PORT)

        # the actors reach it at the host of their --learner URL: the learner Service, rank 0 only
        actor = container(rendered.component("actor"))
        service = rendered.one("Service", self.service_of(urlparse(flag(actor["args"], "--learner"))))
        weights = [p for p in service["spec"]["ports"] if p["name"] == "weights"]
        self.assertEqual(weights, [{"name": "weights", "port": WEIGHTS_PORT, "targetPort": "weights"}])
        template_labels = sts["spec"]["template"]["metadata"]["labels"]
        for ordinal in range(sts["spec"]["replicas"]):
            labels = {**template_labels, **self.controller_labels(sts, ordinal)}
            self.assertEqual(selects(service["spec"]["selector"], labels), ordinal == 0)
        # the actors follow by default and carry the NCCL settings the nccl backend needs
        self.assertNotIn("--no-weight-broadcast", actor["args"])
        self.assertEqual(env_of(actor)["NCCL_SOCKET_IFNAME"]["value"], "eth0")
        self.assertEqual(env_of(actor)["NCCL_DEBUG"]["value"], "WARN")

        # the chart's --set flags come first, so the user's overrides are laid over them
        values = deep_merge(everything_on(), {"learner": {"weightBroadcast": {"enabled": True}}})
        args = container(Rendered(values, self.chart).one("StatefulSet"))["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        self.assertEqual(sets, [
            "learner.weight_broadcast.enabled=true",
            "learner.weight_broadcast.port=29600",
            "learner.weight_broadcast.backend=auto",
            "learner.steps=100",
            "learner.algo.prm.beta=0.1",
        ])

    def test_weight_broadcast_refuses_what_cannot_work(self):
        for port in ("grpcPort", "metricsPort", "rendezvousPort"):
            taken = self.rendered["defaults"].values["learner"][port]
            with self.subTest(port=port), self.assertRaises(helm.HelmRenderError) as raised:
                self.chart.render(
                    {"learner": {"weightBroadcast": {"enabled": True, "port": taken}}},
                    name=RELEASE, namespace=NAMESPACE,
                )
            self.assertIn(f"learner.weightBroadcast.port {taken}", str(raised.exception))
        # the port must stay the one the chart exposes: the keys it sets are not overrides
        for key in ("enabled=true", "port=31000", "backend=tcp"):
            with self.subTest(key=key), self.assertRaises(helm.HelmRenderError) as raised:
                self.chart.render(
                    {"learner": {"overrides": [f"learner.weight_broadcast.{key}"]}},
                    name=RELEASE, namespace=NAMESPACE,
                )
            self.assertIn("learner.weightBroadcast", str(raised.exception))
        # the other broadcast keys are overrides like any other
        rendered = Rendered({"learner": {"overrides": ["learner.weight_broadcast.join_window_ms=500"]}}, self.chart)
        self.assertIn("learner.weight_broadcast.join_window_ms=500", container(rendered.one("StatefulSet"))["args"])

    def test_weight_broadcast_flags_against_the_real_binary(self):
        """The rendered learner arguments and run config given to a real `prime learner serve`: the
        config with the broadcast's --set values is accepted (the run stops later, at the
        missing model), and one bad value in the same place is refused by name."""
        binary = prime_binary()
        if binary is None:
            self.skipTest("no prime binary built yet (make test builds it before this test)")
        rendered = self.rendered["weight-broadcast"]
        c = container(rendered.one("StatefulSet"))
        config_name = Path(flag(c["args"], "--config")).name
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / config_name
            config.write_text(rendered.one("ConfigMap")["data"][config_name])
            args = list(c["args"])
            for name, value in [("--config", str(config)), ("--run-dir", f"{tmp}/run"),
                                ("--listen", "127.0.0.1:0"), ("--device", "cpu")]:
                args[args.index(name) + 1] = value
            at = args.index("--metrics-listen")
            del args[at:at + 2]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIME_", "RANK", "WORLD_SIZE", "MASTER_"))}
            env["RUST_BACKTRACE"] = "0"
            run = lambda a: subprocess.run([binary, *a], env=env, capture_output=True, text=True, timeout=120)

            result = run(args)
            self.assertNotEqual(result.returncode, 0)
            self.assertNotIn("Error: config", result.stderr)
            self.assertIn("/models/Eurus-2-7B-SFT", result.stderr)

            bad = [a.replace("backend=nccl", "backend=udp") for a in args]
            self.assertNotEqual(bad, args)
            result = run(bad)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("Error: config", result.stderr)
            self.assertIn("learner.weight_broadcast.backend", result.stderr)

        # the opt-out the docs give actors outside the broadcast is a flag `prime actor run` has
        help_text = subprocess.run([binary, "actor", "run", "--help"], capture_output=True, text=True).stdout
        self.assertIn("--no-weight-broadcast", help_text)

    # --- TLS ----------------------------------------------------------------------------------

    def test_tls_is_off_by_default(self):
        for case in ["defaults", "multi-node", "everything-on", "cpu-only"]:
            rendered = self.rendered[case]
            for w in rendered.workloads():
                c = container(w)
                with self.subTest(case=case, workload=w["metadata"]["name"]):
                    self.assertFalse([name for name in env_of(c) if name.startswith("PRIME_TLS_")])
                    self.assertNotIn("tls", {v["name"] for v in w["spec"]["template"]["spec"]["volumes"]})
                    self.assertFalse([a for a in c["args"] if a.startswith("https://")])

    def test_tls_servers_get_certificate_and_key(self):
        for case in TLS_CASES:
            rendered = self.rendered[case]
            mutual = rendered.values["tls"]["mutual"]
            for component in TLS_SERVERS:
                w = rendered.component(component)
                env = env_of(container(w))
                with self.subTest(case=case, component=component):
                    file = lambda name: secret_file(w, env[name]["value"])
                    self.assertEqual(file("PRIME_TLS_CERT"), (TLS_SECRET, "tls.crt"))
                    self.assertEqual(file("PRIME_TLS_KEY"), (TLS_SECRET, "tls.key"))
                    if mutual:
                        # clients must present a certificate signed by the CA
                        self.assertEqual(file("PRIME_TLS_CLIENT_CA"), (TLS_SECRET, "ca.crt"))
                    else:
                        self.assertNotIn("PRIME_TLS_CLIENT_CA", env)
                    self.assertNotIn("--allow-no-token", container(w)["args"])

    def test_tls_clients_get_the_ca_and_only_what_they_present(self):
        cases = {
            "tls": (self.rendered["tls"], None),
            "mutual, shared certificate": (Rendered(tls_on(mutual=True), self.chart), (TLS_SECRET, "tls")),
            "mutual, own certificate": (self.rendered["mutual-tls"], ("eurus-prime-actor-tls", "tls")),
        }
        for case, (rendered, presents) in cases.items():
            actor = rendered.component("actor")
            env = env_of(container(actor))
            with self.subTest(case=case):
                self.assertEqual(secret_file(actor, env["PRIME_TLS_CA"]["value"]), (TLS_SECRET, "ca.crt"))
                # the actors dial two services: no single --tls-domain, the URL hosts are checked
                self.assertNotIn("PRIME_TLS_DOMAIN", env)
                self.assertFalse({"PRIME_TLS_CERT", "PRIME_TLS_KEY", "PRIME_TLS_CLIENT_CA"} & set(env))
                if presents is None:
                    self.assertNotIn("PRIME_TLS_CLIENT_CERT", env)
                    self.assertNotIn("PRIME_TLS_CLIENT_KEY", env)
                    # a client that presents nothing holds no private key
                    self.assertEqual(secret_keys(actor, TLS_SECRET), {"ca.crt"})
                else:
                    secret, _ = presents
                    self.assertEqual(secret_file(actor, env["PRIME_TLS_CLIENT_CERT"]["value"]), (secret, "tls.crt"))
                    self.assertEqual(secret_file(actor, env["PRIME_TLS_CLIENT_KEY"]["value"]), (secret, "tls.key"))
                    if secret != TLS_SECRET:
                        # with their own certificate the actors never see the servers' key
                        self.assertEqual(secret_keys(actor, TLS_SECRET), {"ca.crt"})

    def test_tls_secret_is_mounted_read_only(self):
        for case in TLS_CASES:
            rendered = self.rendered[case]
            holders = set()
            for w in rendered.workloads():
                pod = w["spec"]["template"]["spec"]
                tls_volumes = {
                    v["name"]: v for v in pod["volumes"]
                    if any(s.get("secret", {}).get("name") == TLS_SECRET for s in v.get("projected", {}).get("sources", []))
                }
                if not tls_volumes:
                    continue
                holders.add(w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])
                for v in tls_volumes.values():
                    mode = v["projected"]["defaultMode"]
                    with self.subTest(case=case, workload=w["metadata"]["name"], mode=oct(mode)):
                        # readable, never writable or executable
                        self.assertEqual(mode & 0o444, 0o444 if "fsGroup" not in pod["securityContext"] else 0o440)
                        self.assertEqual(mode & 0o333, 0)
                mounts = [m for m in container(w)["volumeMounts"] if m["name"] in tls_volumes]
                with self.subTest(case=case, workload=w["metadata"]["name"]):
                    self.assertEqual(len(mounts), 1)
                    self.assertIs(mounts[0]["readOnly"], True)
                    self.assertEqual(mounts[0]["mountPath"], TLS_DIR)
            self.assertEqual(holders, {"learner", "verifier", "prm-server", "actor"})

    def test_tls_probes_are_not_native_grpc_probes(self):
        for case in TLS_CASES:
            rendered = self.rendered[case]
            names = tls_dns_names(rendered)
            for component in TLS_SERVERS:
                w = rendered.component(component)
                c = container(w)
                env = env_of(c)
                port = port_number(c, "grpc")
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
                    p = c[probe]
                    with self.subTest(case=case, component=component, probe=probe):
                        # the kubelet's gRPC probe speaks no TLS: `prime status` over TLS instead
                        self.assertNotIn("grpc", p)
                        command = p["exec"]["command"]
                        self.assertEqual(command[:2], ["prime", "status"])
                        self.assertEqual(flag(command, "--addr"), f"https://127.0.0.1:{port}")
                        self.assertEqual(listen_port(flag(c["args"], "--listen")), port)
                        # the kubelet's default of 1 s is too short for a process start
                        self.assertGreaterEqual(p["timeoutSeconds"], 5)
                        self.assertLessEqual(float(flag(command, "--timeout-secs")), p["timeoutSeconds"])
                # what `prime status` in the container needs: the CA, the name of the
                # certificate (127.0.0.1 is not in it) and, for mutual TLS, a certificate
                self.assertEqual(secret_file(w, env["PRIME_TLS_CA"]["value"]), (TLS_SECRET, "ca.crt"))
                own = rendered.one("Service", self.service_of(urlparse("https://" + env["PRIME_TLS_DOMAIN"]["value"])))
                self.assertEqual(own["spec"]["selector"]["app.kubernetes.io/component"], component)
                self.assertIn(env["PRIME_TLS_DOMAIN"]["value"], names)
                if rendered.values["tls"]["mutual"]:
                    self.assertEqual(secret_file(w, env["PRIME_TLS_CLIENT_CERT"]["value"]), (TLS_SECRET, "tls.crt"))
                    self.assertEqual(secret_file(w, env["PRIME_TLS_CLIENT_KEY"]["value"]), (TLS_SECRET, "tls.key"))

    def test_cert_manager_example_fits_the_chart(self):
        """examples/cert-manager.yaml issues what examples/tls.yaml names, for the names the
        chart dials, with the usages mutual TLS needs, from one CA."""
        objects = [o for o in yaml.safe_load_all(CERT_MANAGER_EXAMPLE.read_text()) if o]
        namespace = {o["metadata"]["namespace"] for o in objects}
        self.assertEqual(len(namespace), 1)
        values = deep_merge(example_values(), helm.values_from_yaml(TLS_EXAMPLE.read_text()))
        rendered = Rendered(values, self.chart, name="eurus", namespace=namespace.pop())
        tls = rendered.values["tls"]
        self.assertTrue(tls["enabled"] and tls["mutual"])
        certificates = {o["spec"]["secretName"]: o for o in objects if o["kind"] == "Certificate"}
        issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
        for o in objects:
            self.assertEqual(o["apiVersion"], "cert-manager.io/v1")
        servers = certificates[tls["secretName"]]["spec"]
        self.assertEqual(sorted(servers["dnsNames"]), sorted(tls_dns_names(rendered)))
        self.assertTrue({"server auth", "client auth"} <= set(servers["usages"]))
        client = certificates[tls["clientSecretName"]]["spec"]
        self.assertIn("client auth", client["usages"])
        self.assertNotIn("server auth", client["usages"])
        # one CA Issuer signs both, so ca.crt in either Secret verifies the other side
        self.assertEqual(servers["issuerRef"], client["issuerRef"])
        ca_issuer = issuers[servers["issuerRef"]["name"]]["spec"]["ca"]
        ca = certificates[ca_issuer["secretName"]]["spec"]
        self.assertTrue(ca["isCA"])
        self.assertIn("selfSigned", issuers[ca["issuerRef"]["name"]]["spec"])
        for spec in (servers, client):
            self.assertLess(int(spec["renewBefore"].removesuffix("h")), int(spec["duration"].removesuffix("h")))

    def test_tls_notes(self):
        rendered = self.rendered["mutual-tls"]
        self.assertEqual(
            tls_dns_names(rendered),
            [
                f"{RELEASE}-prime-learner.{NAMESPACE}.svc.cluster.local",
                f"{RELEASE}-prime-verifier.{NAMESPACE}.svc.cluster.local",
                f"{RELEASE}-prime-prm-server.{NAMESPACE}.svc.cluster.local",
            ],
        )
        notes = rendered.manifests["prime/templates/NOTES.txt"]
        self.assertIn(f"exec {RELEASE}-prime-learner-0 -- prime status --addr https://127.0.0.1:50051", notes)
        self.assertIn("client auth", notes)

    # --- the chart against the real binary -----------------------------------------------------

    def test_commands_and_flags_exist_in_the_binary(self):
        """Every subcommand, flag and PRIME_* variable the chart passes is one `prime` has (its
        --help), the exec probes' `prime status` included."""
        binary = prime_binary()
        if binary is None:
            self.skipTest("no prime binary built yet (make test builds it before this test)")
        used: dict[tuple[str, ...], set[str]] = {}
        envs: dict[tuple[str, ...], set[str]] = {}
        for rendered in self.rendered.values():
            for w in rendered.workloads():
                c = container(w)
                args = c["args"]
                command = tuple(a for a in args[:2] if not a.startswith("-"))
                self.assertIn(command, ROLE_COMMANDS, "every role starts as `prime ROLE VERB`")
                used.setdefault(command, set()).update(a for a in args if a.startswith("--"))
                env = {name for name in env_of(c) if name.startswith("PRIME_")}
                probes = [c[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe") if "exec" in c.get(p, {})]
                for probe in probes:
                    self.assertEqual(probe[0], "prime")
                    probe_command = tuple(a for a in probe[1:3] if not a.startswith("-"))
                    used.setdefault(probe_command, set()).update(a for a in probe if a.startswith("--"))
                    # the client half of the TLS environment is there for the probe
                    envs.setdefault(probe_command, set()).update(env & (PROBE_TLS_ENV | {"PRIME_TOKEN"}))
                if probes:
                    env -= PROBE_TLS_ENV
                envs.setdefault(command, set()).update(env)
        helps = {}
        for command, flags in sorted(used.items()):
            with self.subTest(command=" ".join(command)):
                result = subprocess.run([binary, *command, "--help"], capture_output=True, text=True)
                self.assertEqual(result.returncode, 0, result.stderr)
                helps[command] = result.stdout
                known = set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))
                self.assertEqual(flags - known, set(), f"flags prime {' '.join(command)} does not have")
                read = set(re.findall(r"\[env: (PRIME_[A-Z_]+)", result.stdout))
                self.assertEqual(envs.get(command, set()) - read, set(), f"variables prime {' '.join(command)} does not read")
        # every server with TLS flags gets the TLS files when TLS is on
        prm_help = helps.get(("prm-server", "serve"), "")
        self.assertIn("--tls-cert", prm_help)
        prm = container(self.rendered["mutual-tls"].component("prm-server"))
        self.assertIn("PRIME_TLS_CERT", env_of(prm))

    def test_tls_against_the_real_binary(self):
        """The rendered TLS wiring, run: a real `prime verifier serve` with the verifier
        container's arguments and environment (the Secret's files in a temporary directory,
        with a certificate for exactly the names NOTES.txt lists), its exec probes as the
        kubelet runs them, and `prime status` with the actors' environment."""
        binary = prime_binary()
        if binary is None:
            self.skipTest("no prime binary built yet (make test builds it before this test)")
        if shutil.which("openssl") is None:
            self.skipTest("openssl is needed to make the test certificates")
        cases = {"tls": tls_on(), "mutual, shared certificate": tls_on(mutual=True), "mutual, example": mutual_tls()}
        for case, values in cases.items():
            with self.subTest(case=case), tempfile.TemporaryDirectory() as tmp:
                values["auth"] = {"token": "probe-token-0123456789"}
                rendered = Rendered(values, self.chart)
                check_tls_live(self, binary, rendered, Path(tmp))

if __name__ == "__main__":
    unittest.main()
