"""Refuse to merge adapters of different base models (or with no module in common) unless told to.

Merging a GPT-2 adapter with an OPT adapter used to write the union of their unrelated modules under the first
one's base name, with exit status 0. Two signals catch it, each with its own rule:

* **The stated bases differ.** PEFT states ``base_model_name_or_path`` (a hub id or a local path); kohya states an
  architecture family in ``ss_base_model_version`` (``sd_v1``, ``sdxl_base_v1-0``, ...) or, in files older than
  that key, ``ss_v2``. kohya's ``ss_sd_model_name`` is *not* compared: it names the checkpoint file a LoRA was
  trained on, and LoRAs of one family are routinely trained on different fine-tunes of it and merged. Names
  compare only within one kind (a family tag and a model id say nothing about each other), and an unknown base
  (no name) never refuses by itself.
* **No module is shared.** An adapter none of whose modules (aligned as ``merge`` aligns them) appears in any
  other input is either of another model or named for another model class (``model.layers...`` vs
  ``layers...``); either way the output would hold a union. This also catches unknown bases.

Model-id rule (deliberately narrow): two names are equal when their last path component (the repository or
folder name) is equal ignoring case, and their owners are equal where both name one. So ``gpt2`` equals
``openai-community/gpt2`` (the Hub moved its legacy un-namespaced models under organisations and keeps the old ids
as aliases) and a local ``/models/gpt2`` (a download of it keeps the repository name), while
``facebook/opt-125m`` differs from ``gpt2`` and ``meta-llama/Llama-2-7b-hf`` from a mirror under another owner
(a false refusal there costs one flag; a false match would cost a silent wrong output).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import ModuleMismatchError

OVERRIDE_FLAG = "--allow-different-bases"


@dataclass(frozen=True)
class BaseName:
    """What an adapter says about its base model."""

    kind: str  # "model": a hub id or local path; "family": a kohya architecture tag
    text: str  # as stated, for messages
    owner: str | None  # hub owner (organisation or user); None for bare ids, local paths and families
    name: str  # repository / folder name or family tag, case-folded

    def same_as(self, other: BaseName) -> bool | None:
        """True/False when comparable, None when the two kinds say nothing about each other."""
        if self.kind != other.kind:
            return None
        if self.name != other.name:
            return False
        return self.owner is None or other.owner is None or self.owner == other.owner


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


def parse_model_name(text: str) -> BaseName | None:
    """A PEFT ``base_model_name_or_path`` as a ``BaseName`` (None when empty)."""
    cleaned = text.strip().replace("\\", "/").rstrip("/")
    parts = [part for part in cleaned.split("/") if part not in ("", ".")]
    if not parts:
        return None
    local = cleaned.startswith(("/", "./", "../", "~")) or bool(_WINDOWS_DRIVE.match(cleaned)) or len(parts) > 2
    owner = parts[0].casefold() if len(parts) == 2 and not local else None
    return BaseName("model", text.strip(), owner, parts[-1].casefold())


def kohya_family(metadata: dict[str, str]) -> str | None:
    """sd-scripts' architecture tag: ``ss_base_model_version``, else ``ss_v2`` of older files (SD 1.x / 2.x)."""
    version = (metadata.get("ss_base_model_version") or "").strip()
    if version:
        return version
    v2 = (metadata.get("ss_v2") or "").strip().casefold()
    if v2 in ("true", "false"):
        return "sd_v2" if v2 == "true" else "sd_v1"
    return None


def base_name(adapter: Adapter) -> BaseName | None:
    """The adapter's base as far as it states one; None when unknown."""
    if adapter.format == "kohya":
        family = kohya_family(adapter.metadata)
        return BaseName("family", family, None, family.casefold()) if family else None
    return parse_model_name(adapter.base_model) if isinstance(adapter.base_model, str) else None


def _describe(adapter: Adapter, base: BaseName | None) -> str:
    return f"{adapter.path} ({base.text if base else 'base unknown'}, {len(adapter.modules)} modules)"


def check_bases(adapters: Sequence[Adapter], slots: dict[str, list[LoraModule | None]],
                allow_different: bool = False) -> list[str]:
    """Raise ``ModuleMismatchError`` when the inputs' stated bases differ or an input shares no module with the
    others (``slots``: merge key -> one slot per adapter, as ``align_modules`` builds them). With
    ``allow_different`` the merge goes on and the returned warnings say what was overridden."""
    if len(adapters) < 2:
        return []
    bases = [base_name(adapter) for adapter in adapters]
    shared_total = sum(1 for modules in slots.values() if sum(m is not None for m in modules) >= 2)
    problems: list[str] = []
    differing = [(i, j) for i in range(len(adapters)) for j in range(i + 1, len(adapters))
                 if bases[i] is not None and bases[j] is not None and bases[i].same_as(bases[j]) is False]
    if differing:
        i, j = differing[0]
        problems.append(f"the adapters were trained on different base models: {_describe(adapters[i], bases[i])} "
                        f"vs {_describe(adapters[j], bases[j])}; {shared_total} module(s) shared")
    isolated = [i for i in range(len(adapters))
                if not any(modules[i] is not None and sum(m is not None for m in modules) >= 2
                           for modules in slots.values())]
    if isolated and not differing:
        others = ", ".join(_describe(adapters[j], bases[j]) for j in range(len(adapters)) if j != isolated[0])
        problems.append(f"{_describe(adapters[isolated[0]], bases[isolated[0]])} shares no module with {others}: "
                        "adapters of different models, or named for different model classes (e.g. with and "
                        "without a 'model.' prefix)")
    if not problems:
        return []
    if not allow_different:
        raise ModuleMismatchError(f"{problems[0]}; merging would write a union of unrelated modules under one base "
                                  f"name; pass {OVERRIDE_FLAG} if that is really meant (e.g. disjoint layers of "
                                  "one model)")
    first = bases[0].text if bases[0] else "no base name"
    return [f"{problem}; merged anyway ({OVERRIDE_FLAG}); the output carries the first adapter's base ({first})"
            for problem in problems]
