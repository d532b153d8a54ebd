"""The router: a manifest (``router.yaml``) mapping domains to a GGUF, an optional LoRA adapter, a profile
and a context length, plus a routing model fitted on each domain's own training prompts that maps a user's
message to a domain, with a confidence. ``gguf-factory route`` shows a decision; ``serve`` routes
``"model": "auto"`` requests with it.

Manifest (YAML). Paths are relative to the manifest's folder and may not climb out of it with ``..``;
``model``, ``adapter``, ``data`` and ``classifier`` may also be absolute paths (files kept elsewhere on
this machine, written deliberately)::

    version: 1
    name: assistants
    default: general          # where low-confidence messages go (optional)
    threshold: 0.4            # classifier confidence below this -> default
    classifier: router.classifier.json   # written by `gguf-factory router fit`
    domains:
      health:
        model: parents/health-Q5_K_M.gguf
        adapter: adapters/cardiology.gguf     # optional GGUF LoRA, applied on the model
        adapter_scale: 1.0
        profile: quality
        context_length: 4096
        keywords: [doctor, symptom]           # optional rules, checked before the classifier
        data: data/health                     # a `prepare` folder: what `router fit` learns from
      ...

Routing model: TF-IDF over word unigrams + bigrams and character 2-4-grams of each word (robust to typos
and inflections on short chat prompts), then a multinomial logistic regression (softmax, L2), trained here
with numpy by full-batch gradient descent. Stored as JSON (vocabulary, idf, weights) - never pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import DataError, InputError
from .files import atomic_write_json, atomic_write_text, manifest_path, require_file
from .schema import read_yaml_model, validation_message

log = logging.getLogger(__name__)

AUTO = "auto"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WORD_RE = re.compile(r"\w+", re.UNICODE)
CLASSIFIER_FORMAT = "gguf-factory-router/1"


# --------------------------------------------------------------------------------------------- manifest


class DomainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="GGUF file (relative to the manifest)")
    adapter: str | None = Field(None, description="GGUF LoRA adapter applied on the model")
    adapter_scale: float = Field(1.0, gt=0, le=4)
    profile: str | None = None
    context_length: int | None = Field(None, gt=0)
    keywords: list[str] = Field(default_factory=list)
    data: str | None = Field(None, description="`prepare` folder of this domain's conversations")
    description: str = ""

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        out = [k.strip().lower() for k in v]
        if any(not k for k in out):
            raise ValueError("a keyword is empty")
        return out


class RouterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str = "router"
    default: str | None = None
    threshold: float = Field(0.0, ge=0, le=1)
    classifier: str | None = None
    domains: dict[str, DomainSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> RouterManifest:
        for name in self.domains:
            if name == AUTO or not _NAME_RE.match(name):
                raise ValueError(
                    f"domain name {name!r} must be 1-64 letters, digits, '_', '.' or '-' and not {AUTO!r}"
                )
        if self.default is not None and self.default not in self.domains:
            raise ValueError(
                f"default {self.default!r} is not one of the domains ({', '.join(self.domains)})"
            )
        return self


def read_manifest(path: str | os.PathLike[str]) -> RouterManifest:
    """Parse and validate a router manifest; errors name the file and the field path."""
    return read_yaml_model(path, RouterManifest, "router manifest", "a 'domains' mapping")


def write_manifest(manifest: RouterManifest, path: str | os.PathLike[str]) -> Path:
    import yaml

    doc = manifest.model_dump(exclude_defaults=True, exclude_none=True)
    doc = {"version": 1, **doc}
    for spec in doc.get("domains", {}).values():
        if not spec.get("keywords"):
            spec.pop("keywords", None)
    text = "# gguf-factory router manifest\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------- features


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def _features(text: str) -> Counter[str]:
    words = _WORD_RE.findall(_normalize(text))
    feats: Counter[str] = Counter()
    for w in words:
        feats["w:" + w] += 1
        padded = f"<{w}>"
        for n in (2, 3, 4):
            for i in range(len(padded) - n + 1):
                feats["c:" + padded[i : i + n]] += 1
    for a, b in zip(words, words[1:], strict=False):
        feats[f"b:{a} {b}"] += 1
    return feats


@dataclass
class TextClassifier:
    """TF-IDF features + softmax regression. ``predict`` returns probabilities per domain."""

    domains: list[str]
    vocab: dict[str, int]
    idf: np.ndarray
    weights: np.ndarray  # (n_features, n_domains)
    bias: np.ndarray  # (n_domains,)
    meta: dict[str, Any] = field(default_factory=dict)

    def _matrix(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for i, t in enumerate(texts):
            for f, c in _features(t).items():
                j = self.vocab.get(f)
                if j is not None:
                    x[i, j] = (1.0 + math.log(c)) * self.idf[j]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        logits = self._matrix(texts) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def to_json(self) -> dict[str, Any]:
        inv = sorted(self.vocab, key=self.vocab.__getitem__)
        return {
            "format": CLASSIFIER_FORMAT,
            "domains": self.domains,
            "features": inv,
            "idf": [round(float(v), 5) for v in self.idf],
            "weights": [[round(float(v), 5) for v in row] for row in self.weights],
            "bias": [round(float(v), 5) for v in self.bias],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> TextClassifier:
        if not isinstance(doc, dict) or doc.get("format") != CLASSIFIER_FORMAT:
            raise InputError(f"{where}: not a gguf-factory routing model (format {CLASSIFIER_FORMAT})")
        try:
            domains = [str(d) for d in doc["domains"]]
            feats = [str(f) for f in doc["features"]]
            idf = np.asarray(doc["idf"], dtype=np.float32)
            w = np.asarray(doc["weights"], dtype=np.float32)
            b = np.asarray(doc["bias"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: damaged routing model ({e})") from None
        if idf.shape != (len(feats),) or w.shape != (len(feats), len(domains)) or b.shape != (len(domains),):
            raise InputError(f"{where}: damaged routing model (array shapes do not match)")
        return cls(domains, {f: i for i, f in enumerate(feats)}, idf, w, b, dict(doc.get("meta") or {}))


def fit_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    l2: float = 1e-4,
    epochs: int = 300,
    lr: float = 0.5,
    max_features: int = 50_000,
    seed: int = 1234,
) -> TextClassifier:
    """Fit the TF-IDF + softmax-regression routing model on labelled texts (numpy, deterministic)."""
    if len(texts) != len(labels) or not texts:
        raise DataError("no labelled texts to fit the router on")
    domains = sorted(set(labels))
    if len(domains) < 2:
        raise DataError(f"the router needs at least two domains with data, got {domains}")
    df: Counter[str] = Counter()
    for t in texts:
        df.update(_features(t).keys())
    kept = sorted(df, key=lambda f: (-df[f], f))[:max_features]
    vocab = {f: i for i, f in enumerate(kept)}
    n = len(texts)
    idf = np.array([math.log((1 + n) / (1 + df[f])) + 1.0 for f in kept], dtype=np.float32)
    clf = TextClassifier(
        domains,
        vocab,
        idf,
        np.zeros((len(vocab), len(domains)), np.float32),
        np.zeros(len(domains), np.float32),
    )
    x = clf._matrix(texts)
    y = np.zeros((n, len(domains)), dtype=np.float32)
    index = {d: i for i, d in enumerate(domains)}
    for i, lab in enumerate(labels):
        y[i, index[lab]] = 1.0
    # classes weighted equally whatever their size: a big domain must not swallow the small ones
    counts = y.sum(axis=0)
    sample_w = (y @ (n / (len(domains) * counts))).astype(np.float32)[:, None]
    w = np.zeros_like(clf.weights)
    b = np.zeros_like(clf.bias)
    mw, vw = np.zeros_like(w), np.zeros_like(w)
    mb, vb = np.zeros_like(b), np.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, epochs + 1):  # Adam on the full batch
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - y) * sample_w / n
        gw = x.T @ g + l2 * w
        gb = g.sum(axis=0)
        mw = beta1 * mw + (1 - beta1) * gw
        vw = beta2 * vw + (1 - beta2) * gw * gw
        mb = beta1 * mb + (1 - beta1) * gb
        vb = beta2 * vb + (1 - beta2) * gb * gb
        corr1, corr2 = 1 - beta1**step, 1 - beta2**step
        w -= lr * 0.01 * (mw / corr1) / (np.sqrt(vw / corr2) + eps)
        b -= lr * 0.01 * (mb / corr1) / (np.sqrt(vb / corr2) + eps)
    clf.weights, clf.bias = w, b
    clf.meta = {"samples": n, "features": len(vocab), "epochs": epochs, "l2": l2, "seed": seed}
    return clf


# --------------------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class RouteDecision:
    domain: str
    confidence: float
    rule: str
    """``keyword``, ``classifier``, ``default`` (low confidence) or ``only`` (a single domain)."""
    scores: dict[str, float] = field(default_factory=dict)
    matched: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainTarget:
    name: str
    model: Path
    adapter: Path | None
    adapter_scale: float
    profile: str | None
    context_length: int | None
    description: str


class Router:
    """A loaded manifest: the files of each domain and :meth:`route`."""

    def __init__(self, path: str | os.PathLike[str], *, check_files: bool = True):
        self.path = require_file(path, "router manifest")
        self.manifest = read_manifest(self.path)
        base = self.path.parent
        self.targets: dict[str, DomainTarget] = {}
        for name, spec in self.manifest.domains.items():
            where = f"{self.path}: domains.{name}"
            model = manifest_path(base, spec.model, f"{where}.model", absolute=True).resolve()
            adapter = (
                manifest_path(base, spec.adapter, f"{where}.adapter", absolute=True).resolve()
                if spec.adapter
                else None
            )
            if check_files:
                for what, p in (("model", model), ("adapter", adapter)):
                    if p is not None and not p.is_file():
                        raise InputError(f"{self.path}: domains.{name}.{what}: file not found: {p}")
            self.targets[name] = DomainTarget(
                name, model, adapter, spec.adapter_scale, spec.profile, spec.context_length, spec.description
            )
        self.classifier: TextClassifier | None = None
        if self.manifest.classifier:
            cpath = manifest_path(base, self.manifest.classifier, f"{self.path}: classifier", absolute=True)
            if not cpath.is_file():
                raise InputError(
                    f"{self.path}: classifier: file not found: {cpath} (run `gguf-factory router fit`)"
                )
            try:
                doc = json.loads(cpath.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{cpath}: not valid JSON: {e}") from None
            self.classifier = TextClassifier.from_json(doc, str(cpath))
            unknown = sorted(set(self.classifier.domains) - set(self.targets))
            if unknown:
                raise InputError(
                    f"{cpath}: the routing model knows domains the manifest does not: {', '.join(unknown)} "
                    "(refit it with `gguf-factory router fit`)"
                )

    @property
    def domains(self) -> list[str]:
        return list(self.targets)

    def route(self, text: str) -> RouteDecision:
        """The domain for ``text``: a keyword rule if one matches, else the classifier (falling back to
        the manifest's default below its confidence threshold)."""
        m = self.manifest
        if len(self.targets) == 1:
            return RouteDecision(next(iter(self.targets)), 1.0, "only")
        words = _normalize(text)
        hits: dict[str, list[str]] = {}
        for name, spec in m.domains.items():
            found = [k for k in spec.keywords if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", words)]
            if found:
                hits[name] = found
        if hits:
            best = max(hits, key=lambda d: (len(hits[d]), -list(m.domains).index(d)))
            return RouteDecision(best, 1.0, "keyword", matched=tuple(hits[best]))
        if self.classifier is None:
            if m.default:
                return RouteDecision(m.default, 0.0, "default")
            raise InputError(
                f"{self.path}: no keyword matched and there is no routing model (add 'classifier' with "
                "`gguf-factory router fit`, or a 'default' domain)"
            )
        probs = self.classifier.predict([text])[0]
        scores = {d: float(p) for d, p in zip(self.classifier.domains, probs, strict=True)}
        top = max(scores, key=scores.__getitem__)
        if scores[top] < m.threshold and m.default:
            return RouteDecision(m.default, scores[top], "default", scores)
        return RouteDecision(top, scores[top], "classifier", scores)


# --------------------------------------------------------------------------------------------- fitting


@dataclass
class DomainAccuracy:
    domain: str
    train_texts: int
    test_prompts: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.test_prompts if self.test_prompts else float("nan")


@dataclass
class FitResult:
    manifest: Path
    classifier: Path
    domains: list[DomainAccuracy]
    seconds: float
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        total = sum(d.test_prompts for d in self.domains)
        return sum(d.correct for d in self.domains) / total if total else float("nan")

    @property
    def min_accuracy(self) -> float:
        return min((d.accuracy for d in self.domains if d.test_prompts), default=float("nan"))


def _user_prompts(path: Path) -> list[tuple[str, str | None, list[str]]]:
    """(first user message, conversation domain, all user messages) of each conversation of a chat file."""
    from .data import read_chat_file

    out = []
    for conv in read_chat_file(path).conversations:
        users = [m.content for m in conv.messages if m.role == "user"]
        if users:
            out.append((users[0], conv.domain, users))
    return out


def domain_texts(
    manifest: RouterManifest, base: Path, data: str | os.PathLike[str] | None = None
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Training texts (user messages of train.jsonl) and held-out prompts (the first user message of each
    test.jsonl conversation) per domain: from each domain's own ``data`` folder, or from one ``data``
    folder whose conversations carry domain tags (chatterbot categories do)."""
    train: dict[str, list[str]] = {d: [] for d in manifest.domains}
    test: dict[str, list[str]] = {d: [] for d in manifest.domains}
    shared = Path(data) if data is not None else None
    for name, spec in manifest.domains.items():
        if spec.data is None:
            continue
        folder = manifest_path(base, spec.data, f"domains.{name}.data", absolute=True).resolve()
        for split, bucket in (("train.jsonl", train), ("test.jsonl", test)):
            f = folder / split
            if not f.is_file():
                raise InputError(f"domains.{name}.data: no {split} in {folder} (run `gguf-factory prepare`)")
            rows = _user_prompts(f)
            bucket[name] += (
                [t for _, _, users in rows for t in users]
                if split == "train.jsonl"
                else [first for first, _, _ in rows]
            )
    if shared is not None:
        for split, bucket in (("train.jsonl", train), ("test.jsonl", test)):
            f = shared / split
            if not f.is_file():
                raise InputError(f"no {split} in {shared} (run `gguf-factory prepare`)")
            for first, dom, users in _user_prompts(f):
                if dom in bucket and manifest.domains[dom].data is None:
                    bucket[dom] += users if split == "train.jsonl" else [first]
    empty = [d for d, t in train.items() if not t]
    if empty and manifest.default not in empty or len(empty) > 1:
        raise DataError(
            f"no training conversations for domain(s) {', '.join(empty)}: give each a 'data' folder, or "
            "--data with conversations tagged with those domains"
        )
    return train, test


def fit_router(
    manifest_path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    classifier_path: str | os.PathLike[str] | None = None,
    epochs: int = 300,
) -> FitResult:
    """Fit the routing model on each domain's training prompts, measure it on the held-out test prompts,
    write it (JSON) and point the manifest's ``classifier`` at it."""
    t0 = time.perf_counter()
    mpath = require_file(manifest_path, "router manifest")
    manifest = read_manifest(mpath)
    train, test = domain_texts(manifest, mpath.parent, data)
    texts = [t for d, ts in train.items() for t in ts]
    labels = [d for d, ts in train.items() for _ in ts]
    clf = fit_classifier(texts, labels, epochs=epochs)
    accs: list[DomainAccuracy] = []
    confusion: dict[str, dict[str, int]] = {}
    for d in manifest.domains:
        prompts = test.get(d, [])
        preds = [clf.domains[i] for i in clf.predict(prompts).argmax(axis=1)] if prompts else []
        confusion[d] = dict(Counter(preds))
        accs.append(DomainAccuracy(d, len(train.get(d, [])), len(prompts), sum(p == d for p in preds)))
    clf.meta["heldout_accuracy"] = {a.domain: a.accuracy for a in accs if a.test_prompts}
    cpath = Path(classifier_path) if classifier_path else mpath.with_name(f"{mpath.stem}.classifier.json")
    atomic_write_json(cpath, clf.to_json())
    if cpath.resolve().is_relative_to(mpath.parent.resolve()):
        rel = cpath.resolve().relative_to(mpath.parent.resolve()).as_posix()
    else:  # outside the manifest's folder: only an absolute path may point there
        rel = str(cpath.resolve())
    write_manifest(manifest.model_copy(update={"classifier": rel}), mpath)
    return FitResult(mpath, cpath, accs, time.perf_counter() - t0, confusion)


def make_manifest(
    path: str | os.PathLike[str],
    domains: Mapping[str, Mapping[str, Any]],
    *,
    name: str = "router",
    default: str | None = None,
    threshold: float = 0.0,
) -> Path:
    """Write a manifest from ``{domain: {model, adapter, profile, ...}}`` (validated like a file)."""
    try:
        m = RouterManifest.model_validate(
            {"name": name, "default": default, "threshold": threshold, "domains": dict(domains)}
        )
    except ValidationError as e:
        raise InputError(validation_message(path, e)) from None
    return write_manifest(m, path)


def accuracy_table(result: FitResult) -> Iterable[tuple[str, int, int, str]]:
    for d in result.domains:
        acc = f"{100 * d.accuracy:.1f} %" if d.test_prompts else "–"
        yield d.domain, d.train_texts, d.test_prompts, acc
