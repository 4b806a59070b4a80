"""The model card (``README.md``) the trainers write next to a saved model: what TRL 1.13's
trainers write (base model, data set, method with its paper and citation, library versions,
tags), naming nashkern as the library that trained it. Written by
:meth:`~nashkern.rl.online.OnlinePreferenceTrainer.create_model_card` on ``save_model``, on
checkpoints (into ``output_dir``, as TRL) and by ``push_to_hub``."""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Paper:
    """The paper a method comes from: its title, arXiv id and BibTeX entry."""
    title: str
    arxiv_id: str
    bibtex: str


NASH_MD_PAPER = Paper(
    "Nash Learning from Human Feedback", "2312.00886",
    "@inproceedings{munos2024nash,\n"
    "    title     = {{Nash Learning from Human Feedback}},\n"
    "    author    = {R{\\'e}mi Munos and Michal Valko and Daniele Calandriello and Mohammad "
    "Gheshlaghi Azar and Mark Rowland and Zhaohan Daniel Guo and Yunhao Tang and Matthieu Geist "
    "and Thomas Mesnard and C{\\^o}me Fiegel and Andrea Michi and Marco Selvi and Sertan Girgin "
    "and Nikola Momchev and Olivier Bachem and Daniel J. Mankowitz and Doina Precup and Bilal "
    "Piot},\n"
    "    booktitle = {Forty-first International Conference on Machine Learning},\n"
    "    year      = {2024},\n"
    "    note      = {arXiv:2312.00886 (2023)}\n"
    "}")

XPO_PAPER = Paper(
    "Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for "
    "Sample-Efficient RLHF", "2405.21046",
    "@article{xie2024exploratory,\n"
    "    title   = {{Exploratory Preference Optimization: Harnessing Implicit "
    "Q*-Approximation for Sample-Efficient RLHF}},\n"
    "    author  = {Tengyang Xie and Dylan J. Foster and Akshay Krishnamurthy and Corby Rosset "
    "and Ahmed Awadallah and Alexander Rakhlin},\n"
    "    journal = {arXiv preprint arXiv:2405.21046},\n"
    "    year    = {2024}\n"
    "}")

ONLINE_DPO_PAPER = Paper(
    "Direct Language Model Alignment from Online AI Feedback", "2402.04792",
    "@article{guo2024direct,\n"
    "    title   = {{Direct Language Model Alignment from Online AI Feedback}},\n"
    "    author  = {Shangmin Guo and Biao Zhang and Tianlin Liu and Tianqi Liu and Misha "
    "Khalman and Felipe Llinares and Alexandre Ram{\\'e} and Thomas Mesnard and Yao Zhao and "
    "Bilal Piot and Johan Ferret and Mathieu Blondel},\n"
    "    journal = {arXiv preprint arXiv:2402.04792},\n"
    "    year    = {2024}\n"
    "}")

#: libraries whose versions the card lists (those installed)
_LIBRARIES = (("nashkern", "nashkern"), ("Transformers", "transformers"), ("PyTorch", "torch"),
              ("Datasets", "datasets"), ("Tokenizers", "tokenizers"), ("Accelerate", "accelerate"),
              ("PEFT", "peft"))


def library_versions() -> Dict[str, str]:
    """``{display name: version}`` of the installed libraries of :data:`_LIBRARIES`."""
    out = {}
    for shown, dist in _LIBRARIES:
        try:
            out[shown] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "nashkern":
                from .. import __version__ as v  # an uninstalled checkout
                out[shown] = v
    return out


def _as_list(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _yaml_list(name: str, values: Sequence[str]) -> List[str]:
    return [f"{name}:"] + [f"- {v}" for v in values] if values else []


def hub_id(name_or_path: Optional[str]) -> Optional[str]:
    """A model's name when it looks like a Hub id (``org/name`` or ``name``, not a local
    directory or file), else None."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.startswith((".", "/")):
        return None
    return name_or_path


def model_card(*, model_name: str, trainer_name: str, method: str, paper: Optional[Paper],
               base_model: Optional[str], dataset_name=None, tags=None, hub_model_id=None,
               license: Optional[str] = None, language=None) -> str:
    """The text of ``README.md``: YAML metadata (base model when it is a Hub id, data sets,
    tags, ``library_name: transformers``) and the card (base model and data set, the method
    and its paper, how to load it, library versions, citations)."""
    datasets, tag_list = _as_list(dataset_name), list(dict.fromkeys(_as_list(tags)))
    base_id = hub_id(base_model)
    hub_datasets = [d for d in datasets if hub_id(d)]  # local paths stay out of the metadata
    meta = (([f"base_model: {base_id}"] if base_id else []) + _yaml_list("datasets", hub_datasets)
            + ["library_name: transformers", f"model_name: {model_name}"]
            + _yaml_list("tags", tag_list) + ([f"license: {license}"] if license else [])
            + _yaml_list("language", _as_list(language)))
    if base_id:
        origin = f"a fine-tuned version of [{base_id}](https://huggingface.co/{base_id})"
    elif base_model:
        origin = f"a fine-tuned version of `{base_model}` (a local checkpoint)"
    else:
        origin = "a fine-tuned model"
    on_data = ""
    if datasets:
        on_data = " on " + ", ".join(
            f"[{d}](https://huggingface.co/datasets/{d})" if hub_id(d) else f"`{d}`"
            for d in datasets) + (" data sets" if len(datasets) > 1 else " data set")
    repo = hub_model_id or model_name
    method_line = f"This model was trained with {method}"
    if paper is not None:
        method_line += (f", a method introduced in [{paper.title}]"
                        f"(https://huggingface.co/papers/{paper.arxiv_id})")
    lines = ["---", *meta, "---", "", f"# Model Card for {model_name}", "",
             f"This model is {origin}{on_data}.",
             f"It has been trained with nashkern's `{trainer_name}` (online preference "
             "optimisation with fused, streaming log-prob / KL / mixture kernels; a drop-in for "
             "TRL 1.13's trainer of the same name).", "",
             "## Quick start", "", "```python",
             "from transformers import pipeline", "",
             f'generator = pipeline("text-generation", model="{repo}")',
             'print(generator("Tell me a story.", max_new_tokens=64)[0]["generated_text"])',
             "```", "", "## Training procedure", "", method_line + ".", "",
             "### Framework versions", ""]
    lines += [f"- {k}: {v}" for k, v in library_versions().items()]
    lines += ["", "## Citations", ""]
    if paper is not None:
        lines += [f"Cite {method} as:", "", "```bibtex", paper.bibtex, "```", ""]
    return "\n".join(lines)
