"""The README and the docs agree with the code: the commands they show parse, the options they name
exist, every RAEBENCH_* variable the code reads is documented with its default, every option has a
help text, and the links between the markdown files resolve. Nothing here loads a model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = ("README.md", "docs/metrics.md", "results/README.md")  # what a user reads
ALL_DOCS = USER_DOCS + ("bench/README.md",)
#: flags of other programs the README quotes (torchrun, hf, sbatch)
OTHER_PROGRAMS_FLAGS = {"--nproc_per_node", "--local-dir", "--shutdown-timeout", "--signal", "--signals-to-handle"}


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _root_command():
    import typer.main

    from raebench.cli import app

    return typer.main.get_command(app)


def _commands(cmd=None, path=()):
    """(path, click command) for every command and subcommand, the root included."""
    cmd = cmd or _root_command()
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _commands(sub, path + (name,))


def _flags(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def _resolve(words: list[str]):
    """The command a ``raebench`` argv names, and the arguments left for it."""
    cmd, path = _root_command(), []
    while words and words[0] in getattr(cmd, "commands", {}):
        cmd = cmd.commands[words[0]]
        path.append(words.pop(0))
    return cmd, path, words


def _fenced_lines(text: str) -> list[str]:
    """Lines of the fenced code blocks, continuation backslashes joined."""
    blocks, cur = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur = []
            else:
                blocks.append("\n".join(cur))
                cur = None
        elif cur is not None:
            cur.append(line)
    return [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]


def _readme_commands() -> list[tuple[str, str]]:
    out = []
    for name in USER_DOCS:
        for line in _fenced_lines(_text(name)):
            m = re.search(r"(?:^|\s)raebench\s+(.*)", line.split("  #")[0])
            if m:
                out.append((name, m.group(1).strip()))
    return out


def test_the_docs_show_commands():
    assert len(_readme_commands()) >= 10  # the extraction below found them


@pytest.mark.parametrize("doc,args", _readme_commands(), ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_every_command_in_the_docs_code_blocks_parses(doc, args):
    """Parsing only (click's own checks: option names, types, required options); nothing runs."""
    cmd, path, rest = _resolve(shlex.split(args))
    assert path, f"{doc}: `raebench {args}` names no command"
    cmd.make_context(" ".join(["raebench", *path]), rest)  # a usage error raises here


def test_options_shown_with_a_command_belong_to_it():
    """Inline `raebench CMD --flag ...` spans (the Commands table and the prose) name that command's flags."""
    bad = []
    for doc in USER_DOCS:
        for m in re.finditer(r"`raebench ([a-z][^`]*)`", _text(doc)):
            words = m.group(1).replace("\\|", "|").split()
            cmd, path, rest = _resolve(words)
            if not path:
                continue
            flags = _flags(cmd)
            for w in rest:
                for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", w):
                    if flag not in flags:
                        bad.append(f"{doc}: `raebench {m.group(1)}`: {' '.join(path)} has no {flag}")
    assert not bad, "\n".join(bad)


def test_every_flag_the_docs_name_exists():
    known = set().union(*(_flags(c) for _, c in _commands())) | OTHER_PROGRAMS_FLAGS | {"--help"}
    bad = sorted({(doc, f) for doc in USER_DOCS for f in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", _text(doc))
                  if f not in known})
    assert not bad, bad


def test_every_option_has_a_help_text():
    missing = [f"{' '.join(path)} {p.opts[0]}" for path, cmd in _commands() for p in cmd.params
               if getattr(p, "opts", None) and p.opts[0].startswith("-") and not (getattr(p, "help", "") or "").strip()]
    assert not missing, missing


def test_stage2_help_quotes_the_recipe_defaults():
    """`train stage2 --help` gives the recipe's values where the flag defaults to the preset's."""
    from raebench.stage2.train import PRESETS

    recipe = PRESETS["ditdh-xl"]
    fields = {"--resolution": "resolution", "--batch-size": "global_batch", "--lr": "lr", "--ckpt-every": "ckpt_every",
              "--log-every": "log_every"}
    cmd, _, _ = _resolve(["train", "stage2"])
    helps = {p.opts[0]: p.help for p in cmd.params if getattr(p, "opts", None)}
    for flag, field in fields.items():
        m = re.search(r"by default: (\S+) in the recipe", helps[flag])
        assert m, (flag, helps[flag])
        assert float(m.group(1)) == float(getattr(recipe, field)), (flag, m.group(1), getattr(recipe, field))


def _code_env_vars() -> set[str]:
    names = set()
    for folder in ("raebench", "metrics", "baselines"):
        for path in (ROOT / folder).rglob("*.py"):
            names.update(n for n in re.findall(r"RAEBENCH_[A-Z0-9_]+", path.read_text(encoding="utf-8"))
                         if not n.endswith("_"))  # RAEBENCH_<NAME>_WEIGHTS, RAEBENCH_LPIPS_{VGG,ALEX}_...: templates
    return names


def _metric_weights_vars(monkeypatch) -> set[str]:
    """The RAEBENCH_*_WEIGHTS names the metric networks' weight resolvers read: every one asks
    ``local_weights(name, option)``, which reads ``weights_env(name)``; recorded, then the resolver is
    stopped there (nothing is looked up or imported further)."""
    from raebench.metrics import METRICS, extractors, perceptual
    from raebench.metrics.base import EXTRACTORS

    seen = set()

    class Recorded(Exception):
        pass

    def recording(name, given=None):
        seen.add(extractors.weights_env(name))
        raise Recorded

    monkeypatch.setattr(extractors, "local_weights", recording)
    monkeypatch.setattr(perceptual, "local_weights", recording)
    for spec in [EXTRACTORS.get(n) for n in EXTRACTORS.names()] + [METRICS.get(n) for n in METRICS.names()]:
        if spec.weights_path is not None:
            with pytest.raises(Recorded):
                spec.weights_path()
    return seen


def test_every_raebench_variable_is_documented(monkeypatch):
    docs = _text("README.md") + _text("docs/metrics.md")
    names = _code_env_vars() | _metric_weights_vars(monkeypatch)
    assert {"RAEBENCH_CACHE", "RAEBENCH_INCEPTION_WEIGHTS", "RAEBENCH_DREAMSIM_WEIGHTS"} <= names  # the search works
    missing = sorted(n for n in names if not re.search(re.escape(n) + r"(?![A-Z0-9_])", docs))
    assert not missing, f"not in README.md or docs/metrics.md: {missing}"
    table = _env_table()
    listed = set().union(*table)
    assert not sorted(n for n in names if n not in listed), "missing from the README's Environment variables table"


def _env_table() -> dict[tuple[str, ...], str]:
    """The README's Environment variables table: (variables of a row) -> its default column."""
    section = _text("README.md").split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "RAEBENCH_" in cells[0]:
            names = re.findall(r"RAEBENCH_[A-Z0-9_]+", cells[0] + (" " + cells[2] if "<NAME>" in cells[0] else ""))
            rows[tuple(names)] = cells[1]
    return rows


def test_the_readme_gives_each_variables_default_as_the_code_has_it(monkeypatch):
    from raebench import distributed
    from raebench.images import _max_pixels
    from raebench.metrics import cache, extractors

    table = {name: default for names, default in _env_table().items() for name in names}
    assert table["RAEBENCH_DIST_TIMEOUT_S"] == f"{distributed.DEFAULT_TIMEOUT_S:g}"
    assert table["RAEBENCH_DIGEST_WAIT_S"] == f"{extractors.DIGEST_WAIT_S:g}"
    side = int(table["RAEBENCH_MAX_PIXELS"].rstrip("²"))
    assert side * side == _max_pixels(None)
    assert table["RAEBENCH_CACHE"].strip("`") == "~/.cache/raebench"
    monkeypatch.delenv("RAEBENCH_CACHE", raising=False)
    assert cache.raebench_cache() == Path("~/.cache/raebench").expanduser()
    # the prose repeats them
    readme = _text("README.md")
    assert f"`RAEBENCH_DIGEST_WAIT_S` seconds, default {extractors.DIGEST_WAIT_S:g}" in readme
    assert f"`RAEBENCH_DIST_TIMEOUT_S` (default {distributed.DEFAULT_TIMEOUT_S:g} s" in readme
    assert f"`RAEBENCH_MAX_PIXELS` (default {side}²" in readme


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.add(_slug(re.sub(r"^#+ ", "", line)))
    return out


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_links_between_the_docs_resolve(doc):
    here = ROOT / doc
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", here.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (here.parent / path) if path else here
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, bad


def test_the_readme_names_every_registered_tokenizer_metric_dataset_and_preset():
    from raebench.data import DATASETS
    from raebench.metrics import METRICS
    from raebench.stage1.config import PRESETS as STAGE1
    from raebench.stage2.models import MODELS
    from raebench.tokenizers import TOKENIZERS

    readme, metrics_doc = _text("README.md"), _text("docs/metrics.md")

    def named(name: str, text: str) -> bool:
        return re.search(r"(?<![\w.-])" + re.escape(name) + r"(?![\w.-])", text) is not None

    missing = [f"tokenizer {n}" for n in TOKENIZERS.names() if not named(n, readme)]
    missing += [f"metric {n}" for n in METRICS.names() if not named(n, metrics_doc)]
    missing += [f"metric alias {a}" for n in METRICS.names() for a in METRICS.aliases_of(n) if not named(a, metrics_doc)]
    missing += [f"dataset {n}" for n in DATASETS.names() if not named(n, readme)]
    missing += [f"stage-1 preset {n}" for n in STAGE1 if not named(n, readme)]
    # stage 2: `ditdh-s/b/l/xl`, `lightningdit-s/b/l/xl` (the tiny test models aside)
    sizes: dict[str, set[str]] = {}
    for m in MODELS.names():
        if not m.endswith("tiny"):
            sizes.setdefault(m.rsplit("-", 1)[0], set()).add(m.rsplit("-", 1)[1])
    for family, got in sizes.items():
        if f"`{family}-{'/'.join(s for s in ('s', 'b', 'l', 'xl') if s in got)}`" not in readme:
            missing.append(f"stage-2 models {family}-{sorted(got)}")
    assert not missing, missing


def test_bench_readme_commands_name_existing_scripts_and_flags():
    """`python bench/X.py --flag ...` in bench/README.md: the script exists and defines each flag."""
    bad, seen = [], 0
    for line in _fenced_lines(_text("bench/README.md")):
        m = re.search(r"bench/([\w-]+\.(?:py|sh))(.*)", line.split("  #")[0])
        if not m:
            continue
        seen += 1
        script = ROOT / "bench" / m.group(1)
        if not script.is_file():
            bad.append(f"no bench/{m.group(1)}")
            continue
        source = script.read_text(encoding="utf-8")
        bad += [f"bench/{m.group(1)} has no {flag}" for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", m.group(2))
                if f'"{flag}"' not in source]
    assert seen >= 10 and not bad, bad
