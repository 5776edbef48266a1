"""
The package's layering, read from the source: no import cycle, the diffusion maths free of
process code and networks, every reference import path alive, every subpackage installed.
See ARCHITECTURE.md.
"""

import ast
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "guided_diffusion"

# ARCHITECTURE.md's layers: a module imports from its own layer or lower-numbered ones only. An
# entry names a module or a whole subpackage; the longest matching entry decides.
LAYERS = {
    0: "errors",
    1: "diffusion losses gaussian_diffusion respace resample",
    2: "runtime dist_util logger image_datasets data",
    3: "nn networks fp16_util unet dit cgan.networks vae.networks",
    4: "script_util cli",
    5: "train_util training sampling evaluation cgan vae",
}
_ENTRIES = {f"{PACKAGE}.{m}": n for n, names in LAYERS.items() for m in names.split()}


def layer_of(module):
    """The layer of a dotted module name (None when no entry covers it)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        layer = _ENTRIES.get(".".join(parts[:i]))
        if layer is not None:
            return layer
    return 0 if module == PACKAGE else None


# The diffusion maths: pure functions of tensors and schedules (layers 0 and 1).
def is_maths(module):
    return module == PACKAGE or layer_of(module) in (0, 1)


# What the maths must never reach: processes and I/O, and the networks.
FORBIDDEN_FOR_MATHS = {
    f"{PACKAGE}.{name}" for name in ("dist_util", "logger", "unet", "dit", "networks", "nn",
                                     "fp16_util", "cgan", "vae", "runtime", "training",
                                     "sampling", "cli")
}
# Top-level folders of the repository that are scripts or experiments, never library code.
NOT_LIBRARY = ("datasets", "evaluations", "experiments", "scripts", "benchmarks", "tests")

# The reference's public import paths (module -> names), as researchers' code uses them.
REFERENCE_PATHS = {
    "dist_util": ["setup_dist", "dev", "load_state_dict", "sync_params"],
    "fp16_util": ["convert_module_to_f16", "convert_module_to_f32", "MixedPrecisionTrainer",
                  "make_master_params", "master_params_to_model_params", "zero_grad"],
    "gaussian_diffusion": ["GaussianDiffusion", "get_named_beta_schedule", "LossType",
                           "ModelMeanType", "ModelVarType", "betas_for_alpha_bar"],
    "image_datasets": ["load_data", "ImageDataset", "center_crop_arr", "random_crop_arr"],
    "logger": ["configure", "log", "logkv", "logkv_mean", "dumpkvs", "get_dir", "warn"],
    "losses": ["normal_kl", "discretized_gaussian_log_likelihood", "approx_standard_normal_cdf"],
    "nn": ["mean_flat", "timestep_embedding", "update_ema", "zero_module", "scale_module",
           "normalization", "conv_nd", "linear", "avg_pool_nd", "checkpoint", "SiLU",
           "GroupNorm32"],
    "resample": ["create_named_schedule_sampler", "ScheduleSampler", "UniformSampler",
                 "LossAwareSampler", "LossSecondMomentResampler"],
    "respace": ["SpacedDiffusion", "space_timesteps"],
    "script_util": ["model_and_diffusion_defaults", "create_model_and_diffusion",
                    "classifier_defaults", "create_classifier", "sr_model_and_diffusion_defaults",
                    "sr_create_model_and_diffusion", "create_gaussian_diffusion",
                    "add_dict_to_argparser", "args_to_dict", "str2bool", "NUM_CLASSES"],
    "train_util": ["TrainLoop", "parse_resume_step_from_filename", "log_loss_dict",
                   "find_resume_checkpoint", "get_blob_logdir"],
    "unet": ["UNetModel", "SuperResModel", "EncoderUNetModel", "AttentionPool2d"],
}


# ---------------------------------------------------------------------------------- the walk


def package_modules(root, package):
    """{dotted module name: path} for every .py file under root/package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def import_graph(root, package):
    """
    {module: set of package modules it imports}, from every import statement anywhere in the
    file (module level and inside functions), absolute or relative. `from X import name` counts
    X, and X.name too when that is a module. Also returns the imports that name no existing
    module of the package: [(importer, target)].
    """
    modules = package_modules(root, package)
    graph, unresolved = {}, []
    # Names a package's __init__ binds: `from pkg import name` may take those as well as modules.
    bound = {name: _bound_names(path) for name, (path, is_package) in modules.items() if is_package}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
                if source.split(".")[0] == package and source not in modules:
                    unresolved.append((name, source))
                for alias in node.names if source in bound else ():
                    if f"{source}.{alias.name}" not in modules and alias.name not in bound[source]:
                        unresolved.append((name, f"{source}.{alias.name}"))
            for target in targets:
                if target in modules and target != name:
                    edges.add(target)
                elif isinstance(node, ast.Import) and target.split(".")[0] == package:
                    unresolved.append((name, target))
        graph[name] = edges
    return graph, unresolved


def _bound_names(path):
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(graph, start):
    """Every module `start` imports, directly or not; importing a.b.c runs a and a.b too."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        parents = [".".join(node.split(".")[:i]) for i in range(1, node.count(".") + 1)]
        for nxt in list(graph.get(node, ())) + parents:
            if nxt not in seen and nxt in graph:
                seen.add(nxt)
                todo.append(nxt)
    return seen - {start}


def _family(module):
    """guided_diffusion.cgan.training -> guided_diffusion.cgan (what FORBIDDEN names)."""
    parts = module.split(".")
    return ".".join(parts[:2])


# ---------------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def walked():
    return import_graph(ROOT, PACKAGE)


def test_the_package_has_no_import_cycle(walked):
    graph, _ = walked
    assert len(graph) > 30  # the walk saw the package
    assert f"{PACKAGE}.cgan.training" in graph[f"{PACKAGE}.cgan"]  # subpackages are walked
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_follow_the_layers_of_architecture_md(walked):
    graph, _ = walked
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"place these in LAYERS (and ARCHITECTURE.md): {unplaced}"
    upward = [f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
              for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_the_library_imports_no_script_folder():
    """The installed package must not reach datasets/, evaluations/ or experiments/: they are
    not installed (and `datasets` would be Hugging Face's)."""
    bad = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in NOT_LIBRARY]
    assert not bad, bad


# Ways of running a file by its path. An import the walk above cannot see: a library module that
# loads scripts this way depends on the checkout's folders without an import statement.
PATH_LOADERS = {"spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader",
                "run_path", "load_source", "exec", "execfile"}


def path_loads(root, package):
    """
    "file:line name" of every call in the package's modules that runs code from a file path
    (importlib's spec_from_file_location, runpy.run_path, exec, ...), however it is spelled
    (importlib.util.spec_from_file_location(...), a bare name after from-import, an alias).
    """
    found = []
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                aliases.update({a.asname or a.name: a.name for a in node.names})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            name = aliases.get(name, name)
            if name in PATH_LOADERS:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_no_library_module_runs_a_file_by_path():
    """Scripts are loaded by path only by tools outside the package (docs/generate_flags.py,
    the tests); the installed library has no checkout to load them from."""
    assert path_loads(ROOT, PACKAGE) == []


def test_the_path_load_check_can_fail(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import importlib.util\n"
                              "spec = importlib.util.spec_from_file_location('x', 'scripts/x.py')\n")
    (pkg / "b.py").write_text("from runpy import run_path as rp\nrp('scripts/y.py')\n")
    (pkg / "c.py").write_text("exec(open('z.py').read())\nimport runpy\nrunpy.run_module('m')\n")
    assert path_loads(tmp_path, "demo") == ["demo/a.py:2 spec_from_file_location",
                                            "demo/b.py:2 run_path", "demo/c.py:1 exec"]


def test_every_package_import_names_an_existing_module(walked):
    _, unresolved = walked
    assert not unresolved, unresolved


def test_the_maths_imports_neither_process_code_nor_networks(walked):
    graph, _ = walked
    maths = sorted(m for m in graph if is_maths(m))
    assert f"{PACKAGE}.diffusion.solvers" in maths and f"{PACKAGE}.gaussian_diffusion" in maths
    for module in maths:
        reached = {_family(m) for m in reachable(graph, module)} | reachable(graph, module)
        bad = sorted(reached & FORBIDDEN_FOR_MATHS)
        assert not bad, f"{module} imports {bad}"
        # Stronger: the maths closes over itself (plus the empty package __init__s).
        assert all(is_maths(m) for m in reachable(graph, module)), module


def test_the_walk_can_fail(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "fam").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fam" / "__init__.py").write_text("from .net import Net\n")
    (pkg / "maths.py").write_text("import numpy\n\ndef f():\n    from .helpers import g\n")
    (pkg / "helpers.py").write_text("from . import procs\n")
    (pkg / "procs.py").write_text("import demo.fam.net\n")
    (pkg / "fam" / "net.py").write_text(
        "def build():\n    from ..maths import f\nfrom .. import gone\n")
    graph, unresolved = import_graph(tmp_path, "demo")
    cycle = find_cycle(graph)
    # maths -> helpers (function level) -> procs -> fam.net (absolute) -> maths (relative, ..)
    assert cycle is not None and set(cycle) == {"demo.maths", "demo.helpers", "demo.procs",
                                                "demo.fam.net"}
    assert {"demo.procs", "demo.fam.net", "demo.fam"} <= reachable(graph, "demo.maths")
    assert unresolved == [("demo.fam.net", "demo.gone")]
    (pkg / "fam" / "net.py").write_text("X = 1\n")
    graph, _ = import_graph(tmp_path, "demo")
    assert find_cycle(graph) is None


def _conformance_imports():
    """(module, name) of every `from guided_diffusion... import name` in the conformance tests."""
    found = set()
    for path in sorted((ROOT / "tests").glob("test_*conformance.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                found.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((a.name, None) for a in node.names if a.name.startswith(PACKAGE))
    return sorted(found, key=str)


def test_every_reference_import_path_works():
    from_suite = _conformance_imports()
    assert len(from_suite) > 10
    listed = [(f"{PACKAGE}.{m}", n) for m, names in REFERENCE_PATHS.items() for n in names]
    missing = []
    for module, name in from_suite + listed:
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            try:  # `from package import submodule` works without the attribute
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, missing


def test_every_subpackage_is_installed():
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets))
    packages = {elt.value for elt in listed.elts}
    on_disk = {name for name, (_, is_pkg) in package_modules(ROOT, PACKAGE).items() if is_pkg}
    assert on_disk == packages, sorted(on_disk ^ packages)
    assert os.path.isfile(ROOT / "ARCHITECTURE.md")


@pytest.mark.parametrize("name", ["datasets", "evaluations", "experiments"])
def test_script_folders_are_not_importable_packages(name, tmp_path):
    """With the package installed, `import datasets` must find Hugging Face's (or nothing),
    never our script folder; run from elsewhere so the checkout is not on sys.path."""
    code = (f"import importlib.util, sys; spec = importlib.util.find_spec({name!r}); "
            "print(spec.origin if spec and spec.origin else (list(spec.submodule_search_locations)"
            " if spec else ''))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in out, f"import {name} resolves to this checkout: {out}"
    # The scripts at the reference's paths stay where users run them from.
    assert (ROOT / "evaluations" / "evaluator.py").is_file()
    assert (ROOT / "datasets" / "digits.py").is_file()


@pytest.mark.parametrize("family", ["cgan", "vae"])
def test_model_family_packages_export_their_public_names(family):
    package = importlib.import_module(f"{PACKAGE}.{family}")
    missing = []
    for name, (path, is_pkg) in package_modules(ROOT, f"{PACKAGE}/{family}").items():
        if is_pkg:
            continue
        module = importlib.import_module(name.replace("/", "."))
        public = getattr(module, "__all__", None) or [
            n for n, obj in vars(module).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
        ]
        missing += [f"{module.__name__}.{n}" for n in public if n not in package.__all__]
        assert all(getattr(package, n) is getattr(module, n) for n in public if n in package.__all__)
    assert not missing, missing
