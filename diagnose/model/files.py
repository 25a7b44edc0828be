"""The files of a Hugging Face model folder, checked before transformers reads them, so that a
broken one is named.

Why: transformers' own errors do not say which file failed ("tokenizer does not load
(JSONDecodeError: Unterminated string ...)" for a cut ``tokenizer.json``), and a named pipe in
the folder would block its reader. Every loader of a model folder (the probe, the rescore, the
trainer's resume and ``--init-from``) calls `check_model_files` first: each file transformers
would read is a regular file (`diagnose.regular_file`), each JSON file parses to an object, each
chat template compiles, each ``*.safetensors`` header reads (nothing is unpickled, no tensor is
loaded). A file that is absent is not a problem here: the loader says what it misses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from diagnose.regular_file import DIRECTORY, not_regular, read_bytes

__all__ = ["CONFIG_FILES", "TOKENIZER_FILES", "WEIGHT_FILE_RE", "ModelFileError", "check_model_files",
           "model_file_problems"]

#: Files the model's loader reads (``AutoConfig`` / ``AutoModelForCausalLM``), JSON objects.
CONFIG_FILES: tuple[str, ...] = ("config.json", "generation_config.json", "model.safetensors.index.json")
#: Files ``AutoTokenizer`` reads: JSON objects, and text (the chat template, BPE merges).
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                    "added_tokens.json", "vocab.json", "chat_template.json")
TEXT_FILES: tuple[str, ...] = ("chat_template.jinja", "merges.txt")
#: Weight files a loader reads: safetensors (preferred), or PyTorch ``.bin`` state dicts loaded with
#: ``torch.load(weights_only=True)``. Everything else in a checkpoint (``training_args.bin``,
#: ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``) is a pickle and is never opened.
WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


class ModelFileError(ValueError):
    """A file of a model folder that transformers could not read; ``path`` names it and the
    message is ``<path>: <why>``."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why
        super().__init__(f"{path}: {why}")


def _json_object(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = read_bytes(path)
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    try:
        text = data.decode("utf-8-sig")
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start}): binary or corrupt data"
    except json.JSONDecodeError as e:
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")  # fails at the end
        cut = " (truncated?)" if ends else ""
        return None, f"not valid JSON{cut}: {e}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _template_problem(template: object) -> str | None:
    """Why a chat template (a string, or TRL/transformers' list of ``{name, template}``) would
    not compile; None when it does."""
    if isinstance(template, list):
        for i, t in enumerate(template):
            if not isinstance(t, dict) or not isinstance(t.get("template"), str):
                return f"chat_template[{i}] is not a {{name, template}} object"
            why = _template_problem(t["template"])
            if why:
                return f"chat_template[{i}]: {why}"
        return None
    if not isinstance(template, str):
        return f"chat_template is {type(template).__name__}, not a string"
    try:
        import jinja2
    except ImportError:  # transformers cannot render it either; it says so when it tries
        return None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:
        compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        return f"chat template does not compile (line {e.lineno}: {e.message})"
    except Exception as e:  # noqa: BLE001 - whatever the compiler raises, one line
        return f"chat template does not compile ({type(e).__name__}: {str(e)[:200]})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - incl. a Rust panic: any header error means unreadable
        text = str(e).strip().splitlines()
        return f"model does not load: not a readable safetensors file ({type(e).__name__}: {text[0][:200] if text else ''})"
    return None


def _file_problem(path: Path) -> str | None:
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith(".bin"):  # a state dict: read by torch.load(weights_only=True), not here
        return None
    if name in TEXT_FILES:
        try:
            text = read_bytes(path).decode("utf-8-sig")
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
        except UnicodeDecodeError as e:
            return f"not valid UTF-8 (byte {e.start}): binary or corrupt data"
        return _template_problem(text) if name == "chat_template.jinja" else None
    obj, why = _json_object(path)
    if why or obj is None:
        return why
    if name in ("tokenizer_config.json", "chat_template.json") and obj.get("chat_template") is not None:
        return _template_problem(obj["chat_template"])
    return None


def _present(d: Path, names: Iterable[str]) -> list[Path]:
    return [d / n for n in names if os.path.lexists(d / n)]


def model_file_problems(d: str | os.PathLike[str], *, model: bool = True,
                        tokenizer: bool = True) -> list[tuple[Path, str]]:
    """``(file, why)`` for every file of model folder ``d`` that transformers would fail on:
    the config and weights (``model``) and the tokenizer's files (``tokenizer``). Files that are
    absent are not listed."""
    d = Path(d)
    files: list[Path] = []
    if model:
        files += _present(d, CONFIG_FILES)
        try:
            files += sorted(p for p in d.iterdir() if p.name.endswith(".safetensors") or WEIGHT_FILE_RE.match(p.name))
        except OSError:
            pass
    if tokenizer:
        files += _present(d, TOKENIZER_FILES + TEXT_FILES)
    out = []
    for f in files:
        why = not_regular(f)
        if why is None:
            why = _file_problem(f)
        if why is not None:
            out.append((f, why))
    return out


def check_model_files(d: str | os.PathLike[str], *, model: bool = True, tokenizer: bool = True) -> None:
    """Raise `ModelFileError` naming the first file of ``d`` that would not load (see
    `model_file_problems`); a folder that is not one raises it for the folder."""
    d = Path(d)
    why = not_regular(d)
    if why != DIRECTORY:
        raise ModelFileError(d, "a file, not a model folder" if why is None else why)
    problems = model_file_problems(d, model=model, tokenizer=tokenizer)
    if problems:
        raise ModelFileError(*problems[0])
