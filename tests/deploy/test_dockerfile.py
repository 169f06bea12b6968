"""deploy/Dockerfile, parsed and held to the Makefile's build and the chart.

No container engine can run here, so the image is checked as text: its stages, what the
runtime stage copies and installs, its user and entry point, and that it builds the way
`make build` does (the torch wheel's libtorch through LIBTORCH_USE_PYTORCH=1, vendored protoc).
Where the layout of the pinned torch wheel matters (the rpaths the runtime copy relies on),
the check reads the real files in the project venv and the built binary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
MAKEFILE = REPO / "Makefile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        pending += stripped
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    if pending:
        raise ValueError(f"dangling continuation: {pending!r}")
    return result


def stages(text: str) -> list[dict]:
    """One entry per FROM: its image, name and instructions."""
    found: list[dict] = []
    global_args: dict[str, str] = {}
    for keyword, args in instructions(text):
        if keyword == "ARG" and not found:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], args)
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", image, re.I)
            found.append({"image": m.group(1), "name": m.group(2), "steps": [], "args": global_args})
        elif found:
            found[-1]["steps"].append((keyword, args))
    return found


def apt_packages(command: str) -> set[str]:
    packages: set[str] = set()
    for part in re.split(r"&&|;", command):
        words = part.split()
        if "apt-get" in words and "install" in words:
            packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return packages


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = DOCKERFILE.read_text()
        cls.stages = stages(cls.text)
        cls.build, cls.runtime = cls.stages[0], cls.stages[-1]

    def runs(self, stage: dict) -> str:
        return "\n".join(args for keyword, args in stage["steps"] if keyword == "RUN")

    def test_parser_reads_instructions(self):
        parsed = instructions("# c\nFROM a AS b\nRUN x \\\n    && y\n\nUSER 1\n")
        self.assertEqual(parsed, [("FROM", "a AS b"), ("RUN", "x && y"), ("USER", "1")])

    def test_multi_stage(self):
        self.assertGreaterEqual(len(self.stages), 2)
        self.assertEqual(self.build["name"], "build")
        self.assertTrue(self.build["image"].startswith("rust:"))
        self.assertTrue(self.runtime["image"].startswith("debian:"), self.runtime["image"])
        self.assertIn("-slim", self.runtime["image"])
        # both stages on the same Debian release, so the binary finds the libc it was built for
        release = self.build["args"]["DEBIAN_RELEASE"]
        self.assertEqual(self.build["image"], f"rust:{self.build['args']['RUST_VERSION']}-{release}")
        self.assertEqual(self.runtime["image"], f"debian:{release}-slim")
        # the toolchain is at least the workspace's rust-version
        minimum = re.search(r'rust-version = "(\d+)\.(\d+)"', (REPO / "Cargo.toml").read_text())
        major, minor = map(int, self.build["args"]["RUST_VERSION"].split(".")[:2])
        self.assertGreaterEqual((major, minor), (int(minimum.group(1)), int(minimum.group(2))))

    def test_build_is_make_build(self):
        run = self.runs(self.build)
        self.assertRegex(run, r"\bmake build\b")
        makefile = MAKEFILE.read_text()
        build_recipe = re.search(r"^build:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
        self.assertIn("cargo build --release", build_recipe)
        self.assertIn("-p prime-cli", build_recipe)
        self.assertRegex(makefile, r"export LIBTORCH_USE_PYTORCH := 1")
        # libtorch is the PyPI wheel's, pinned where the Makefile's venv takes it from
        requirements = (REPO / "tests/python/requirements.txt").read_text()
        self.assertRegex(requirements, r"(?m)^torch==2\.13\.0$")
        # nothing in the image build brings another libtorch or a system protoc
        for forbidden in ["LIBTORCH=", "libtorch-", "download.pytorch", "protobuf-compiler", "PROTOC=", "curl ", "wget "]:
            self.assertNotIn(forbidden, self.text)
        self.assertNotRegex(self.text, r"LIBTORCH_USE_PYTORCH\s*=\s*(?!1)")
        proto = (REPO / "proto/Cargo.toml").read_text()
        self.assertIn("protoc-bin-vendored", proto)
        self.assertIn("python3-venv", apt_packages(run))

    def test_runtime_copies_binary_and_torch_libraries(self):
        build_run = self.runs(self.build)
        self.assertIn("cp target/release/prime /stage/usr/local/bin/prime", build_run)
        self.assertIn('"$site/torch/lib"', build_run)
        self.assertIn('"$site"/nvidia/*/lib', build_run)
        # the staging step proves the pieces are there before the runtime stage takes them
        for lib in ["libtorch_cuda.so", "libc10.so", "nvidia/nccl/lib/libnccl.so"]:
            self.assertIn(lib, build_run)
        copies = [args for keyword, args in self.runtime["steps"] if keyword == "COPY"]
        self.assertIn("--from=build /stage/ /", copies)
        runtime_run = self.runs(self.runtime)
        self.assertIn("ldd /usr/local/bin/prime", runtime_run)
        self.assertIn("prime --version", runtime_run)

    def test_runtime_packages(self):
        packages = apt_packages(self.runs(self.runtime))
        self.assertTrue({"python3", "bubblewrap", "tini"} <= packages, packages)
        self.assertIn("--no-install-recommends", self.runs(self.runtime))

    def test_non_root_user_matches_the_chart(self):
        users = [args for keyword, args in self.runtime["steps"] if keyword == "USER"]
        self.assertTrue(users)
        uid, _, gid = users[-1].partition(":")
        self.assertTrue(uid.isdigit(), "numeric, so runAsNonRoot can verify it")
        self.assertNotEqual(int(uid), 0)
        self.assertIn(f"--uid {uid}", self.runs(self.runtime))
        values = yaml.safe_load((REPO / "deploy/helm/prime/values.yaml").read_text())
        self.assertEqual(values["podSecurity"]["runAsUser"], int(uid))
        self.assertEqual(values["podSecurity"]["runAsGroup"], int(gid or uid))
        # USER comes after every RUN: nothing later runs as root
        keywords = [keyword for keyword, _ in self.runtime["steps"]]
        self.assertGreater(len(keywords) - keywords[::-1].index("USER"), max(i for i, k in enumerate(keywords) if k == "RUN"))

    def test_entrypoint_is_prime(self):
        entrypoints = [args for keyword, args in self.runtime["steps"] if keyword == "ENTRYPOINT"]
        self.assertEqual(len(entrypoints), 1)
        entrypoint = json.loads(entrypoints[0])  # exec form: signals reach the process
        self.assertEqual(entrypoint[-1], "prime")
        self.assertEqual(entrypoint[0], "/usr/bin/tini")

    def test_context_files_exist_and_build_outputs_are_ignored(self):
        for keyword, args in self.build["steps"] + self.runtime["steps"]:
            if keyword == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    self.assertTrue((REPO / source).exists(), source)
        ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
        self.assertTrue({"target", "runs", ".git"} <= ignored)

    @unittest.skipUnless(shutil.which("readelf"), "readelf (binutils) not installed")
    def test_rpaths_the_runtime_copy_relies_on(self):
        """The binary finds libtorch by an absolute rpath into site-packages/torch/lib, and
        libtorch_cuda finds the CUDA and NCCL libraries at ../../nvidia/*/lib: copying both
        trees to the same paths is what makes the runtime stage work."""
        site = Path(
            subprocess.run(
                [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
        torch_lib = site / "torch" / "lib"
        self.assertTrue((torch_lib / "libtorch_cuda.so").exists(), "the venv has the CUDA torch wheel")
        dynamic = subprocess.run(["readelf", "-d", str(torch_lib / "libtorch_cuda.so")], capture_output=True, text=True, check=True).stdout
        rpath = re.search(r"R(?:UN)?PATH\)\s+Library r(?:un)?path: \[(.*)\]", dynamic).group(1).split(":")
        nvidia = [p for p in rpath if p.startswith("$ORIGIN/../../nvidia/")]
        self.assertTrue(nvidia)
        for entry in nvidia:
            self.assertRegex(entry, r"^\$ORIGIN/\.\./\.\./nvidia/[^/]+/lib$")  # covered by nvidia/*/lib
            self.assertTrue((torch_lib / entry.replace("$ORIGIN/", "")).resolve().is_dir(), entry)
        self.assertTrue(list((site / "nvidia" / "nccl" / "lib").glob("libnccl.so.*")))
        binary = next((p for p in [REPO / "target/release/prime", REPO / "target/debug/prime"] if p.exists()), None)
        if binary is not None:
            dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
            self.assertRegex(dynamic, r"R(?:UN)?PATH.*/site-packages/torch/lib")


if __name__ == "__main__":
    unittest.main()
