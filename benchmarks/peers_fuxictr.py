"""The FuxiCTR side of `benchmarks/peers.py`: trains, evaluates and probes one FuxiCTR 2.3.10 model from a spec
written by `peers.run_fuxictr`. Run by the FuxiCTR virtualenv's python (WORK/venv/bin/python peers_fuxictr.py SPEC),
so it imports FuxiCTR, torch, numpy and the standard library only, nothing of this project; the defects it works
around and probes are described in `peers.py`'s docstring."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
WINDOW_MODELS = ("SIM", "ETA", "SDIM", "TWIN")  # the ones with a short window, defect (b)


def _source_line(path: Path, needle: str) -> str:
    """`file:line: text` of the first line of `path` holding `needle`, or a note that 2.3.10 has no such line."""
    try:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if needle in line:
                return f"{path}:{i}: {line.strip()}"
    except OSError:
        pass
    return f"NOT FOUND in {path}: {needle!r}"


def _fuxictr_sources(site: Path) -> dict[str, list[str]]:
    """The lines each defect claim rests on, looked up in the installed package (so a claim that is not true of this
    version shows up as NOT FOUND instead of being repeated)."""
    zoo = site / "model_zoo" / "LongCTR"
    loader = zoo / "longctr_dataloader.py"
    dien = zoo / "DIEN" / "DIEN.py"

    def each_window_model(needle: str) -> list[str]:
        return [_source_line(zoo / m / f"{m}.py", needle) for m in WINDOW_MODELS]

    short_mask = each_window_model("short_mask = mask[:, -self.short_seq_len:-1]")
    short_emb = each_window_model("short_seq_emb = item_feat_emb[:, -self.short_seq_len:-1, :]")
    return {
        "a": [
            _source_line(zoo / "run_expid.py", "import fuxictr_version"),
            _source_line(zoo / "fuxictr_version.py", "assert version.parse"),
        ],
        "b": [*short_emb, *short_mask, _source_line(loader, "max_len = min(max(seq_lens), self.max_len)")],
        "c": [
            _source_line(loader, 'padding="pre"'),
            _source_line(dien, "seq_lens = mask.sum(dim=1).cpu()"),
            _source_line(dien, "packed_seq = pack_padded_sequence(sequence_emb"),
            _source_line(loader, "truncating=self.padding"),
        ],
        "d": [
            _source_line(zoo / "SIM" / "SIM.py", "qk = torch.bmm(q, k.transpose(-1, -2)).squeeze(1) * mask"),
            _source_line(zoo / "SIM" / "SIM.py", "topk_index = qk.topk("),
        ],
        "e": [_source_line(site / "fuxictr" / "metrics.py", "pool = mp.Pool(processes=mp.cpu_count() // 2)")],
        "f": [*short_emb, *short_mask],
    }


class _SerialPool:
    """Stands in for multiprocessing.Pool in fuxictr.metrics: runs each task at once, in this process."""

    class _Done:
        def __init__(self, value: Any):
            self.value = value

        def get(self) -> Any:
            return self.value

    def __init__(self, processes: int | None = None):
        pass

    def apply_async(self, fn: Any, args: tuple = ()) -> _SerialPool._Done:
        return self._Done(fn(*args))

    def close(self) -> None:
        pass

    def join(self) -> None:
        pass


class _SerialMP:
    Pool = _SerialPool

    @staticmethod
    def cpu_count() -> int:
        return os.cpu_count() or 1


def _patched_padding(collator: Any, min_width: int, padding: str) -> None:
    """Replace one collator's `padding_seqs`: the last max_len behaviors (truncating "pre", as shipped), padded at
    `padding`, to at least `min_width` positions (defect (b): a batch narrower than the short window crashes)."""
    import types

    from fuxictr.preprocess.tokenizer import pad_sequences

    def padding_seqs(self: Any, user_seqs: Any, seq_lens: Any) -> np.ndarray:
        seqs = [seq[:n][-self.max_len :] for seq, n in zip(user_seqs, seq_lens, strict=True)]
        width = max(min(int(max(seq_lens)), self.max_len), min_width)
        return pad_sequences(seqs, maxlen=width, value=0, padding=padding, truncating="pre")

    collator.padding = padding
    collator.padding_seqs = types.MethodType(padding_seqs, collator)


def _build(spec: dict[str, Any]) -> tuple[dict[str, Any], Any, Any, tuple[Any, Any, Any]]:
    """FuxiCTR's params, feature map, model and (train, valid, test) loaders for the spec's expid, as its run script
    builds them (its LongCTR loader; the collators as shipped: `_patched_padding` is the caller's)."""
    import logging

    import model_zoo.LongCTR as zoo
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything
    from fuxictr.utils import load_config, set_logger
    from model_zoo.LongCTR.longctr_dataloader import LongCTRDataLoader

    params = load_config(spec["config_dir"], spec["expid"])
    params["gpu"] = -1
    set_logger(params)
    logging.info("spec: %s", spec)
    seed_everything(seed=params["seed"])
    encoder = FeatureProcessor(**params)
    params["train_data"], params["valid_data"], params["test_data"] = build_dataset(encoder, **params)
    feature_map = FeatureMap(params["dataset_id"], encoder.data_dir)
    feature_map.load(encoder.json_file, params)
    model = getattr(zoo, params["model"])(feature_map, **params)
    model.count_parameters()
    params["data_loader"] = LongCTRDataLoader
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params)
    test_gen = RankDataLoader(feature_map, stage="test", **params)
    return params, feature_map, model, (train_gen, valid_gen, test_gen)


def fuxictr_step_rate(spec_path: Path) -> int:
    """The cost of a training step alone (`benchmarks/cost_curve.py`): `spec["warmup"]` + `spec["steps"]` training
    batches prefetched from FuxiCTR's loader (padded as `fuxictr_run` pads them), then its `train_step` timed over
    the last `steps` (forward, loss, backward, Adam), as our side is timed."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    params, _, model, (train_gen, _, _) = _build(spec)
    peer = params["model"]
    window = int(params.get("short_seq_len", 0)) if peer in WINDOW_MODELS else 0
    post = spec["variant"] == "post-padded"
    if window or post:
        _patched_padding(train_gen.collate_fn, window, "post" if post else "pre")
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    batches = []
    for batch in train_gen:
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    model.train()
    model._max_gradient_norm = params["max_gradient_norm"]  # what its fit() sets before train_epoch

    def step(index: int, batch: Any) -> None:  # as its train_epoch calls it (train_step reads _batch_index)
        model._batch_index = index
        model.train_step(batch).item()

    for i, batch in enumerate(batches[:warmup]):
        step(i, batch)
    timed = batches[warmup:]
    t0 = time.perf_counter()
    for i, batch in enumerate(timed, start=warmup):
        step(i, batch)
    dt = time.perf_counter() - t0
    samples = sum(int(b[2].shape[0]) for b in timed)
    result = {
        "model": peer,
        "variant": spec["variant"],
        "max_len": int(params["max_len"]),
        "steps": len(timed),
        "step_ms": dt / max(len(timed), 1) * 1e3,
        "samples_per_s": samples / dt if dt > 0 else None,
        "batch_samples": samples / max(len(timed), 1),
        "torch_threads": torch.get_num_threads(),
    }
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=2))
    return 0


def fuxictr_run(spec_path: Path) -> int:
    """Train, evaluate and probe one FuxiCTR model (run by WORK/venv/bin/python, see `run_fuxictr`)."""
    import multiprocessing

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import fuxictr
    import fuxictr.metrics as fxm
    from model_zoo.LongCTR.longctr_dataloader import BatchCollator

    site = Path(fuxictr.__file__).resolve().parents[1]
    probes: dict[str, Any] = {"sources": _fuxictr_sources(site)}
    # (a) the run script's version pin
    pin = _source_line(site / "model_zoo" / "LongCTR" / "fuxictr_version.py", "assert version.parse")
    asserted = pin.rsplit('"', 2)[-2] if pin.count('"') >= 2 else None
    probes["a"] = {"run_script_asserts": asserted, "installed": fuxictr.__version__,
                   "fails": asserted is not None and asserted != fuxictr.__version__}  # fmt: skip
    # (e) the metrics pool on one core, then the in-process pool for the rest of the run
    one_core = type("OneCore", (), {"Pool": multiprocessing.Pool, "cpu_count": staticmethod(lambda: 1)})
    fxm.mp = one_core
    try:
        fxm.evaluate_metrics(np.array([0.0, 1.0]), np.array([0.2, 0.8]), ["gAUC"], np.array([1, 1]))
        probes["e"] = {"fails_on_one_core": False}
    except ValueError as e:
        probes["e"] = {"fails_on_one_core": True, "error": f"{type(e).__name__}: {e}"}
    fxm.mp = _SerialMP

    params, feature_map, model, (train_gen, valid_gen, test_gen) = _build(spec)
    peer = params["model"]
    max_len = int(params["max_len"])
    window = int(params.get("short_seq_len", 0)) if peer in WINDOW_MODELS else 0
    post = spec["variant"] == "post-padded"

    # (b) a batch whose longest history is shorter than the short window, through the collator as shipped
    if window:
        darray, cidx = test_gen.dataset.darray, test_gen.dataset.column_index
        rows = np.flatnonzero(darray[:, cidx["seq_len"]] < window)[:64]
        if rows.size:
            shipped = BatchCollator(feature_map, max_len, cidx, params["user_info"], params["item_info"], "pre")
            model.eval()
            try:
                with torch.no_grad():
                    model.forward(shipped(list(darray[rows])))
                probes["b"] = {"crashes": False, "rows": int(rows.size)}
            except Exception as e:  # noqa: BLE001 - the crash is what is measured
                probes["b"] = {"crashes": True, "rows": int(rows.size), "error": f"{type(e).__name__}: {e}"[:300]}
            model.train()
        else:
            probes["b"] = {"crashes": None, "note": f"no test sample with seq_len < short_seq_len={window}"}
    for gen in (train_gen, valid_gen, test_gen):
        if window or post:
            _patched_padding(gen.collate_fn, window, "post" if post else "pre")

    # training, timed per step: windows of log_every steps, validation time taken out
    marks: list[tuple[float, float, int]] = []
    paused = [0.0]
    train_step, eval_step = model.train_step, model.eval_step

    def timed_train_step(batch: Any) -> Any:
        loss = train_step(batch)
        marks.append((time.perf_counter(), paused[0], int(batch[2].shape[0])))
        return loss

    def timed_eval_step() -> None:
        t = time.perf_counter()
        eval_step()
        paused[0] += time.perf_counter() - t

    model.train_step, model.eval_step = timed_train_step, timed_eval_step
    t0 = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, **params)
    fit_seconds = time.perf_counter() - t0
    every = max(1, int(spec["log_every"]))
    rates, start, start_pause = [], t0, 0.0
    for i in range(every - 1, len(marks), every):
        t, p, _ = marks[i]
        n = sum(m[2] for m in marks[i - every + 1 : i + 1])
        rates.append(n / max(t - start - (p - start_pause), 1e-9))
        start, start_pause = t, p

    # test predictions (best validation model, loaded by fit) and FuxiCTR's own metrics on them
    t = time.perf_counter()
    scores = model.predict(test_gen)
    predict_seconds = time.perf_counter() - t
    test = pq.read_table(params["test_data"], columns=["user_index", "label", "seq_len"])
    labels, users = test["label"].to_numpy().astype(np.float64), test["user_index"].to_numpy()
    own = fxm.evaluate_metrics(labels, scores, ["AUC", "gAUC", "logloss"], users)
    pq.write_table(pa.table({"user_index": users, "label": labels.astype(np.int8), "score": scores}),
                   out / "predictions.parquet")  # fmt: skip

    seq_len = np.minimum(test["seq_len"].to_numpy(), max_len)
    if peer == "DIEN":  # (c) rows shorter than their batch: as shipped their GRUs read padding
        bs = int(params["batch_size"])
        width = np.repeat([seq_len[i : i + bs].max(initial=0) for i in range(0, seq_len.size, bs)], bs)[: seq_len.size]
        short = (seq_len > 0) & (seq_len < width)
        probes["c"] = {"variant": spec["variant"], "reads_padding": not post,
                       "test_rows_shorter_than_batch": int(short.sum()), "test_rows": int(seq_len.size)}  # fmt: skip
    if peer == "SIM":  # (d) top-k picks padding while real behaviors are left out
        probes["d"] = _sim_topk_padding(model, test_gen) | {"topk": int(params["topk"]), "max_len": max_len}

    result = {
        "model": peer,
        "expid": spec["expid"],
        "variant": spec["variant"],
        "fuxictr_version": fuxictr.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "window_rates": rates,  # samples/s per logging window; the driver takes the median (`peers._windows_median`)
        "windows": len(rates),
        "train_steps": len(marks),
        "fit_seconds": round(fit_seconds, 2),
        "validation_seconds": round(paused[0], 2),
        "predict_seconds": round(predict_seconds, 2),
        "epochs_run": int(model._epoch_index) + 1,
        "best_valid_gauc": float(model._best_metric),
        "fuxictr_own_metrics": {k: float(v) for k, v in own.items()},
        "probes": probes,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


def _sim_topk_padding(model: Any, loader: Any) -> dict[str, int]:
    """SIM's first stage as in SIM.forward (`qk = q k^T * mask`, then top-k), counting the samples whose top-k holds
    a padding position although a real behavior was left out (defect (d))."""
    import torch

    affected = rows = 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            _, item_dict, mask = model.get_inputs(batch)
            emb = model.embedding_layer(item_dict, flatten_emb=True).view(mask.shape[0], -1, model.item_info_dim)
            target, seq = emb[:, -1, :], emb[:, :-1, :]
            qk = torch.bmm(model.W_a(target).unsqueeze(1), model.W_b(seq).transpose(-1, -2)).squeeze(1) * mask
            k = min(model.topk, qk.shape[1])
            picked_real = torch.gather(mask, 1, qk.topk(k, dim=1)[1]).sum(1)
            affected += int((picked_real < torch.clamp(mask.sum(1), max=k)).sum())
            rows += mask.shape[0]
    return {"test_rows_with_padding_over_real": affected, "test_rows": rows}


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # no benchmarks/*.py shadowing
    spec_file = Path(sys.argv[1])
    mode = json.loads(spec_file.read_text()).get("mode", "run")
    raise SystemExit(fuxictr_step_rate(spec_file) if mode == "steps" else fuxictr_run(spec_file))
