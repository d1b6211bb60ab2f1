"""`scripts/train-model --distill`: a larger teacher, then a small int8 student taught by it.

Loss of the student (Hinton et al.): alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2
+ (1 - alpha) * CE(hard labels, softmax(student)). The T^2 keeps the soft term's gradients on the
scale of the hard one's as T changes. With --anneal, T falls linearly from --temperature to 1 over the
epochs (soft targets early, sharp ones late).

The loss is chosen by head kind, so the same loop distils an autoencoder: its soft target is the
teacher's reconstruction (alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, input)); T does
not apply there. `--head reconstruction` runs that path on the generator's healthy windows.

The student ships (is written to --out) only if its int8 file is at most a quarter of the teacher's
int8 file and its held-out accuracy is within 2 points of the teacher's. Imported by train-model,
which passes itself in as `tm` (data, export and evaluation helpers live there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

TEACHER_HIDDEN = (256, 128, 64)
STUDENT_HIDDEN = (32, 16)  # the shipped model's shape: the student is a drop-in replacement
AE_TEACHER = (256, 64, 256)
AE_STUDENT = (16, 4, 16)
MAX_SIZE_RATIO = 0.25
MAX_ACC_DROP = 0.02
STUDENT_VERSION = "1.1.0"


@dataclass(frozen=True)
class DistillLoss:
    """Which loss a head kind distils with: "softmax" (KL on softened logits + CE) or
    "reconstruction" (MSE to the teacher's output + MSE to the input)."""

    kind: str
    alpha: float
    temperature: float

    def __call__(self, tf: Any, student_out: Any, teacher_out: Any, target: Any, temperature: Any) -> Any:
        if self.kind == "softmax":
            p = tf.nn.softmax(teacher_out / temperature)
            log_q = tf.nn.log_softmax(student_out / temperature)
            kl = tf.reduce_mean(tf.reduce_sum(p * (tf.math.log(p + 1e-12) - log_q), axis=-1))
            ce = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                target, student_out, from_logits=True))
            return self.alpha * kl * temperature * temperature + (1.0 - self.alpha) * ce
        if self.kind == "reconstruction":
            soft = tf.reduce_mean(tf.square(student_out - teacher_out))
            hard = tf.reduce_mean(tf.square(student_out - target))
            return self.alpha * soft + (1.0 - self.alpha) * hard
        raise ValueError(f"no distillation loss for head kind {self.kind!r}")


def temperature_at(epoch: int, epochs: int, start: float, anneal: bool) -> float:
    """T for `epoch` (0-based): constant, or linear from `start` down to 1 at the last epoch."""
    if not anneal or epochs <= 1:
        return start
    return start + (1.0 - start) * epoch / (epochs - 1)


def train_student(tf: Any, student: Any, x: Any, teacher_out: Any, target: Any, loss: DistillLoss,
                  epochs: int, anneal: bool, seed: int, batch: int = 64) -> list[float]:
    """The distillation loop; returns the mean loss per epoch."""
    import numpy as np

    opt = tf.keras.optimizers.Adam(1e-3)
    rng = np.random.default_rng(seed)
    history = []

    @tf.function(reduce_retracing=True)
    def step(xb: Any, tb: Any, yb: Any, temp: Any) -> Any:
        with tf.GradientTape() as tape:
            value = loss(tf, student(xb, training=True), tb, yb, temp)
        grads = tape.gradient(value, student.trainable_variables)
        opt.apply_gradients(zip(grads, student.trainable_variables, strict=True))
        return value

    for epoch in range(epochs):
        temp = tf.constant(temperature_at(epoch, epochs, loss.temperature, anneal), tf.float32)
        order = rng.permutation(len(x))
        losses = []
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            losses.append(float(step(x[idx], teacher_out[idx], target[idx], temp)))
        history.append(float(np.mean(losses)))
    return history


def dense_stack(tf: Any, x_train: Any, hidden: tuple[int, ...], outputs: int, name: str) -> Any:
    """Normalization -> Dense(ReLU)... -> Dense(outputs) linear (logits or reconstruction)."""
    norm = tf.keras.layers.Normalization()
    norm.adapt(x_train)
    inp = tf.keras.Input((x_train.shape[1],), name="features")
    h = norm(inp)
    for width in hidden:
        h = tf.keras.layers.Dense(width, activation="relu")(h)
    return tf.keras.Model(inp, tf.keras.layers.Dense(outputs, name="out")(h), name=name)


def with_softmax(tf: Any, logits_model: Any) -> Any:
    inp = tf.keras.Input(logits_model.input_shape[1:], name="features")
    return tf.keras.Model(inp, tf.keras.layers.Softmax(name="classes")(logits_model(inp)))


# --------------------------------------------------------------------------- evaluation


def labelled(tm: ModuleType, held_out: dict[str, Any]) -> tuple[Any, Any]:
    """Held-out windows and their class (from the run's key: 'healthy' or 'fault@severity')."""
    import numpy as np

    xs, ys = [], []
    for key, x in held_out.items():
        xs.append(x)
        ys.append(np.full(len(x), tm.LABELS.index(key.split("@")[0])))
    return np.concatenate(xs), np.concatenate(ys)


def classifier_figures(tm: ModuleType, runner: Any, x: Any, y: Any) -> dict[str, float]:
    """Accuracy over all classes; F1 of "anomaly" (any fault) at the shipped threshold."""
    import numpy as np

    probs = np.array([runner(v).reshape(-1) for v in x])
    pred = probs.argmax(axis=1)
    flagged = (1.0 - probs[:, 0]) >= tm.THRESHOLD
    truth = y != 0
    tp = float((flagged & truth).sum())
    precision = tp / max(1.0, float(flagged.sum()))
    recall = tp / max(1.0, float(truth.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((pred == y).mean()), "f1_anomaly": f1}


def reconstruction_figures(runner: Any, x_healthy: Any, x_faulty: Any, norm: Any) -> dict[str, float]:
    """Anomaly by reconstruction error, threshold = 99th percentile of healthy error: accuracy of
    the normal/anomaly call over both sets and F1 of the anomaly class."""
    import numpy as np

    def errors(xs: Any) -> Any:
        return np.array([float(np.mean((runner(v).reshape(-1) - norm(v)) ** 2)) for v in xs])

    eh, ef = errors(x_healthy), errors(x_faulty)
    thr = float(np.percentile(eh, 99))
    tp, fp = float((ef > thr).sum()), float((eh > thr).sum())
    precision, recall = tp / max(1.0, tp + fp), tp / max(1.0, float(len(ef)))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = (float((eh <= thr).sum()) + tp) / (len(eh) + len(ef))
    return {"accuracy": acc, "f1_anomaly": f1}


def bench_latency(path: Path, count: int) -> dict[str, float | None]:
    """p50/p99 through the agent's own `edgeagent bench-model` (its venv, its runtime), same run."""
    exe = tm_repo() / ".venv" / "bin" / "edgeagent"
    if not exe.exists():
        print(f"distill: {exe} missing (run scripts/setup-venv); no latency figures", file=sys.stderr)
        return {"p50_ms": None, "p99_ms": None}
    out = subprocess.run([str(exe), "bench-model", str(path), "--json", "--count", str(count),
                          "--rounds", "2"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    return {"p50_ms": res["runner"]["p50_ms"], "p99_ms": res["runner"]["p99_ms"]}


def tm_repo() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- runs


def run(tm: ModuleType, args: Any) -> int:
    import numpy as np
    import tensorflow as tf

    from edgeagent.core.fsutil import atomic_write_bytes, atomic_write_text

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    n_train, n_eval, t_epochs, s_epochs, eval_windows = (
        (12, 3, 8, 12, 60) if args.quick else (120, 30, 40, 60, 150))
    x_train, y_train = tm.dataset(range(0, n_train), 40, rng)
    held_out = tm.held_out_set(range(100_000, 100_000 + n_eval), eval_windows)
    print(f"data: {len(x_train)} train windows, {sum(len(v) for v in held_out.values())} held-out "
          f"({time.monotonic() - t0:.1f}s)")
    rep = x_train[rng.choice(len(x_train), min(500, len(x_train)), replace=False)]
    out_dir = args.out or (tm.REPO / "build" / "distilled" / tm.NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = args.head
    loss = DistillLoss(kind, args.alpha, args.temperature)

    if kind == "softmax":
        n_out = len(tm.LABELS)
        teacher = dense_stack(tf, x_train, TEACHER_HIDDEN, n_out, "teacher")
        teacher.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        teacher.fit(x_train, y_train, epochs=t_epochs, batch_size=64, verbose=0, shuffle=True)
        soft = teacher.predict(x_train, batch_size=1024, verbose=0)
        student = dense_stack(tf, x_train, STUDENT_HIDDEN, n_out, "student")
        hist = train_student(tf, student, x_train, soft, y_train, loss, s_epochs, args.anneal, args.seed)
        baseline = dense_stack(tf, x_train, STUDENT_HIDDEN, n_out, "baseline")  # same size, labels only
        hard_only = DistillLoss(kind, 0.0, 1.0)
        train_student(tf, baseline, x_train, soft, y_train, hard_only, s_epochs, False, args.seed)
        exports = {"teacher float32": tm.export(with_softmax(tf, teacher)),
                   "teacher int8": tm.export(with_softmax(tf, teacher), rep),
                   "student int8": tm.export(with_softmax(tf, student), rep),
                   "student int8, labels only": tm.export(with_softmax(tf, baseline), rep)}
        x_eval, y_eval = labelled(tm, held_out)
        figures = {k: classifier_figures(tm, tm.Runner(b), x_eval, y_eval) for k, b in exports.items()}
    elif kind == "reconstruction":
        healthy = x_train[y_train == 0]
        teacher = dense_stack(tf, healthy, AE_TEACHER, healthy.shape[1], "teacher")
        norm_layer = teacher.layers[1]
        target = norm_layer(healthy).numpy()
        teacher.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")
        teacher.fit(healthy, target, epochs=t_epochs, batch_size=64, verbose=0, shuffle=True)
        soft = teacher.predict(healthy, batch_size=1024, verbose=0)
        student = dense_stack(tf, healthy, AE_STUDENT, healthy.shape[1], "student")
        hist = train_student(tf, student, healthy, soft, target, loss, s_epochs, False, args.seed)
        exports = {"teacher float32": tm.export(teacher), "teacher int8": tm.export(teacher, rep),
                   "student int8": tm.export(student, rep)}
        faulty = np.concatenate([v for k, v in held_out.items() if k != "healthy"])

        def norm(v: Any) -> Any:
            return norm_layer(v[None, :]).numpy().reshape(-1)

        figures = {k: reconstruction_figures(tm.Runner(b), held_out["healthy"], faulty, norm)
                   for k, b in exports.items()}
    else:
        raise SystemExit(f"distill: unknown head {kind!r} (softmax | reconstruction)")
    print(f"trained teacher and student ({time.monotonic() - t0:.1f}s); student loss per epoch: "
          f"{hist[0]:.4f} -> {hist[-1]:.4f}")

    for label, blob in exports.items():
        path = out_dir / f"{label.replace(' ', '-').replace(',', '')}.tflite"
        atomic_write_bytes(path, blob)
        figures[label].update(size_bytes=len(blob), **bench_latency(path, 300 if args.quick else 2000))
    teacher_fig, student_fig = figures["teacher int8"], figures["student int8"]
    ratio = student_fig["size_bytes"] / teacher_fig["size_bytes"]
    drop = teacher_fig["accuracy"] - student_fig["accuracy"]
    ships = ratio <= MAX_SIZE_RATIO and drop <= MAX_ACC_DROP
    anneal = ", annealed to 1" if args.anneal else ""
    target_note = f"T = {args.temperature:g}{anneal}" if kind == "softmax" else "soft target = teacher output"
    print(f"\nhead {kind}, {target_note}, alpha = {args.alpha:g}; held out: {n_eval} seeds x {eval_windows} "
          f"windows per run")
    print(table(figures))
    verdict = (f"student/teacher int8 size {ratio:.3f} (must be <= {MAX_SIZE_RATIO}), student accuracy "
               f"{-100 * drop:+.2f} points vs the teacher (must be >= {-100 * MAX_ACC_DROP:g})")
    if ships and kind == "softmax":
        atomic_write_bytes(out_dir / "model.tflite", exports["student int8"])
        golden = tm.pick_goldens(tm.Runner(exports["student int8"]), held_out)
        atomic_write_text(out_dir / "model.toml",
                          tm.model_toml(golden).replace(f'version = "{tm.VERSION}"',
                                                        f'version = "{STUDENT_VERSION}"'))
        print(f"student ships: {verdict}; wrote {out_dir}/model.tflite + model.toml "
              f"({time.monotonic() - t0:.1f}s)")
        return 0
    if ships:
        print(f"student ships: {verdict} ({time.monotonic() - t0:.1f}s)")
        return 0
    print(f"student does NOT ship: {verdict} ({time.monotonic() - t0:.1f}s)")
    return 1


def table(figures: dict[str, dict[str, Any]]) -> str:
    """A Markdown table (it goes into docs/models.md as printed)."""
    lines = ["| model | accuracy | F1 (anomaly) | size (bytes) | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    for label, f in figures.items():
        p50 = "-" if f.get("p50_ms") is None else f"{f['p50_ms']:.4f}"
        p99 = "-" if f.get("p99_ms") is None else f"{f['p99_ms']:.4f}"
        lines.append(f"| {label} | {f['accuracy']:.4f} | {f['f1_anomaly']:.4f} | {f['size_bytes']} | "
                     f"{p50} | {p99} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- shadow test fixture


def make_shadow_fixture(tm: ModuleType, args: Any) -> int:
    """tests/models/shadow/flipped/: a student-sized int8 classifier trained on labels shifted by one
    class (healthy -> imbalance -> bearing -> spikes -> healthy): it loads, validates and serves
    finite outputs, and disagrees with the shipped model on nearly every window (the shadow
    evaluation test's rejected candidate)."""
    import numpy as np
    import tensorflow as tf

    from edgeagent.core.fsutil import atomic_write_bytes, atomic_write_text
    from edgeagent.inference.preprocess import load_model_meta

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(args.seed)
    x_train, y_train = tm.dataset(range(0, 12), 40, rng)
    flipped = (y_train + 1) % len(tm.LABELS)
    model = dense_stack(tf, x_train, STUDENT_HIDDEN, len(tm.LABELS), "flipped")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, flipped, epochs=8, batch_size=64, verbose=0, shuffle=True)
    rep = x_train[rng.choice(len(x_train), 500, replace=False)]
    out = args.out or (tm.FIXTURE_DIR / "shadow" / "flipped")
    out.mkdir(parents=True, exist_ok=True)
    blob = tm.export(with_softmax(tf, model), rep)
    atomic_write_bytes(out / "model.tflite", blob)
    toml = tm.model_toml([]).replace('description = "', 'description = "TEST FIXTURE, labels shifted by '
                                     'one class: ')
    atomic_write_text(out / "model.toml", toml)
    load_model_meta(out / "model.toml")
    print(f"wrote {out}/model.tflite ({len(blob)} bytes) + model.toml")
    return 0
