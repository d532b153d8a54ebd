"""``factory.yaml``: one manifest for a multi-domain build (pydantic; errors name the file and field path).

version: 1
name: assistants
base:
  preset: nano               # train the universal model from scratch (a preset name or its fields),
  # model: smollm2-135m-instruct  # or fine-tune a model on all the domains: a HF folder or .gguf
  #                               # (inside this file's folder, or an absolute path), a named base or a
  #                               # Hub id[@revision]
language: english            # chatterbot-corpus language for `categories`
train: {epochs: 10}          # the universal model's training settings (unset: the preset's)
lora: {rank: 8, alpha: 16, epochs: 3}
domains:
  health:
    categories: [health, psychology]   # bundled chatterbot categories and/or
    files: [data/clinic.jsonl]         # your own chat files (relative to this manifest, inside its folder)
    profile: quality                   # production | mobile | quality | development
    keywords: [doctor]                 # router rules checked before the classifier
    subdomains:                        # optional: one LoRA adapter each (else one for the domain)
      mind: {categories: [psychology]}
outputs: {universal: true, lora_gguf: true, router: true}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InputError
from ..files import manifest_path, require_file
from ..schema import read_yaml_model

Profile = Literal["production", "mobile", "quality", "development"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    categories: list[str] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    weight: float = Field(1.0, gt=0, description="merge weight of this adapter in its domain's parent")


class DomainSpec(DataSpec):
    profile: Profile = "production"
    keywords: list[str] = Field(default_factory=list)
    description: str = ""
    subdomains: dict[str, DataSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _data(self) -> DomainSpec:
        for name in self.subdomains:
            if not _NAME_RE.match(name):
                raise ValueError(f"subdomain name {name!r}: letters, digits, '_' or '-', at most 48")
        if not (self.categories or self.files or self.subdomains):
            raise ValueError("a domain needs data: 'categories', 'files' or 'subdomains'")
        for name, sub in self.subdomains.items():
            if not (sub.categories or sub.files):
                raise ValueError(f"subdomains.{name}: needs 'categories' or 'files'")
        return self


class BaseSpec(_Strict):
    preset: str | dict[str, Any] | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one(self) -> BaseSpec:
        if (self.preset is None) == (self.model is None):
            raise ValueError(
                "give exactly one of 'preset' (train from scratch) or 'model' (a HF folder, a .gguf, a "
                "named base or a Hub id)"
            )
        return self


class TrainSpec(_Strict):
    epochs: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    seed: int = 1234


class LoraSpec(TrainSpec):
    rank: int = Field(8, gt=0, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] | None = None
    dropout: float = Field(0.05, ge=0, lt=1)


class SplitSpec(_Strict):
    val: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)
    seed: int = 1234


class OutputsSpec(_Strict):
    universal: bool = True
    lora_gguf: bool = True
    router: bool = True
    router_to: Literal["parents", "adapters"] = "parents"
    """``parents``: one route per domain family, to its merged parent GGUF. ``adapters``: one route per
    adapter (each subdomain, or the domain), to the universal GGUF + that GGUF LoRA (one shared base)."""


class FactoryManifest(_Strict):
    version: Literal[1] = 1
    name: str = Field("factory", pattern=_NAME_RE.pattern)
    base: BaseSpec = Field(default_factory=lambda: BaseSpec(preset="nano"))
    language: str = "english"
    split: SplitSpec = Field(default_factory=SplitSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    domains: dict[str, DomainSpec] = Field(min_length=1)
    outputs: OutputsSpec = Field(default_factory=OutputsSpec)

    @field_validator("domains")
    @classmethod
    def _names(cls, v: dict[str, DomainSpec]) -> dict[str, DomainSpec]:
        for name in v:
            if not _NAME_RE.match(name) or name == "auto":
                raise ValueError(f"domain name {name!r}: letters, digits, '_' or '-', at most 48, not 'auto'")
        return v

    @model_validator(mode="after")
    def _router(self) -> FactoryManifest:
        if self.outputs.router and len(self.domains) < 2:
            raise ValueError("outputs.router needs at least two domains (or set outputs.router: false)")
        if self.outputs.router and self.outputs.router_to == "adapters":
            if not (self.outputs.universal and self.outputs.lora_gguf):
                raise ValueError("outputs.router_to: adapters needs outputs.universal and outputs.lora_gguf")
        return self


def read_factory(path: str | os.PathLike[str]) -> FactoryManifest:
    """Parse and validate ``factory.yaml``; data files must exist (paths relative to the manifest)."""
    p = require_file(path, "factory manifest")
    m = read_yaml_model(p, FactoryManifest, "factory manifest", "a 'domains' mapping")
    for dname, d in m.domains.items():
        for where, spec in [(f"domains.{dname}", d), *((f"domains.{dname}.subdomains.{s}", x)
                                                        for s, x in d.subdomains.items())]:  # fmt: skip
            for i, f in enumerate(spec.files):
                full = manifest_path(p.parent, f, f"{p}: {where}.files[{i}]", absolute=False)
                if not full.is_file():
                    raise InputError(f"{p}: {where}.files[{i}]: file not found: {full}")
    if m.base.model is not None:
        _check_base_model(p, m.base.model)
    return m


def base_model_source(root: Path, model: str) -> str:
    """``base.model`` as a model source: a path relative to the manifest's folder when one exists there (or
    it is written as a path), else the named base or Hub id as written."""
    from ..bases import classify

    local = root / model
    if local.exists() or classify(model) in ("folder", "gguf"):
        return str(manifest_path(root, model, "base.model", absolute=True).resolve())
    return model


def _check_base_model(p: Path, model: str) -> None:
    from ..bases import classify, named_base, parse_hub_id

    source = base_model_source(p.parent, model)
    kind = classify(source)
    try:
        if kind == "folder" and not (Path(source) / "config.json").is_file():
            raise InputError(f"not a Hugging Face model folder: {source}")
        if kind == "gguf" and not Path(source).is_file():
            raise InputError(f"GGUF file not found: {source}")
        if kind == "named":
            named_base(source)
        if kind == "hub":
            parse_hub_id(source)
    except InputError as e:
        raise InputError(f"{p}: base.model: {e}") from None
