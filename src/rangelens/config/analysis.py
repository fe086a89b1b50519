"""What an analysis captures and how it fits ranges (NeuronLens, Haider et al., arXiv 2502.06809)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from rangelens.config.sources import (
    DataSource,
    ModelSource,
    Options,
    Sampling,
    input_digest,
    resolve_dataset,
    resolve_model,
)

# Pooling of a text's tokens into one row (``tokens``: every token is a row).
Position = Literal["last", "first", "cls", "mean", "tokens"]
Ranking = Literal["dprime", "mean_abs", "probeless", "probe"]
RangeMethod = Literal["gaussian", "quantile", "density"]
Dtype = Literal["float32", "bfloat16", "float16"]
DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]  # accelerate's strategies


class Runtime(Options):
    """Where and how the model runs."""

    batch_size: int = Field(16, ge=1, description="texts per forward")
    max_length: int = Field(128, ge=1, description="tokens per text (longer texts are truncated)")
    padding_side: Literal["left", "right"] | None = Field(
        None, description="pad batches on this side (default: the tokenizer's)"
    )
    device: str = Field("cpu", description="cpu | cuda | cuda:N")
    dtype: Dtype = Field("float32", description="weights and activations dtype")
    device_map: DeviceMap | None = Field(
        None,
        description="spread the model's blocks over every GPU (then CPU) with accelerate, for "
        "models larger than one device (replaces device)",
    )


class SiteOptions(Options):
    """Which activations are read: a site of a block."""

    site: str = Field("resid", description="resid | mlp | attn | module:<dotted.path>[:input]")
    layer: int = Field(-1, description="block index; negative counts from the end")


class CaptureOptions(SiteOptions):
    """What the capture stage records."""

    test_size: float = Field(0.2, gt=0, lt=1, description="share of texts held out for testing")
    position: Position = Field("last", description="how a text's tokens are pooled into one row")
    n_bins: int = Field(64, ge=4, description="histogram bins per neuron (streaming statistics)")
    token_texts_per_class: int = Field(
        60,
        ge=0,
        description="texts per class whose per-token activations of the site the capture keeps "
        "(float32, texts x max_length x width x 4 bytes), so explanations of the site drawing "
        "at most this many texts per class run no second forward; 0: keep none",
    )


class RangeOptions(Options):
    """How neurons are ranked and their per-concept ranges fitted."""

    ranking: Ranking = Field(
        "dprime",
        description="dprime | mean_abs (NeuronLens reference code; at the last block it picks "
        "massive-activation dimensions) | probeless | probe",
    )
    tau: float = Field(2.0, gt=0, description="range half-width in standard deviations")
    p: float = Field(0.3, gt=0, le=1, description="share of neurons that are salient per concept")
    taus: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, description="tau sweep: more range maps fitted beside tau"
    )
    ps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list, description="p sweep: more range maps fitted beside p"
    )
    layers: list[int] = Field(
        default_factory=list, description="layer sweep: more mask sites (site kind of 'site')"
    )
    range_method: RangeMethod = Field(
        "gaussian",
        description="gaussian (mean ± tau·std) | quantile | density (likelihood-ratio bands)",
    )
    density_ratio: float = Field(
        1.0, gt=0, description="density bands: likelihood-ratio threshold concept / rest"
    )
    density_ratios: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list,
        description="likelihood-ratio sweep for the erasure 'density' condition, beside density_ratio",
    )
    select: Literal["ranking", "band"] = Field(
        "ranking", description="keep neurons by ranking score, or by band purity × coverage"
    )


class AnalysisConfig(RangeOptions, Runtime, CaptureOptions, Sampling, DataSource, ModelSource):
    """Everything that determines an analysis run (saved resolved in ``run.json``)."""

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisConfig:
        if self.ranking == "probe" and self.position == "tokens":
            raise ValueError(
                "ranking 'probe' needs pooled features; use a position other than 'tokens'"
            )
        return self

    def resolved(self) -> AnalysisConfig:
        """Local dataset/model paths made absolute, so a run records where its inputs are."""
        update = {"dataset": resolve_dataset(self.dataset), "model": resolve_model(self.model)}
        return self.model_copy(update=update)

    def capture_inputs(self) -> dict[str, object]:
        """What determines the capture: content digests of local data and model files (not their
        path spelling), loader options and capture settings."""
        keys = ["test_size", "site", "layer", "position", "n_bins", "max_length", "dtype"]
        inputs = {
            "dataset": input_digest(self.dataset),
            "model": input_digest(self.model),
            **self.loader_options(),
            **{k: getattr(self, k) for k in keys},
        }
        default = CaptureOptions.model_fields["token_texts_per_class"].default
        if self.token_texts_per_class != default:  # runs made before the option stay current
            inputs["token_texts_per_class"] = self.token_texts_per_class
        return inputs

    def range_inputs(self) -> dict[str, object]:
        """What determines the range maps besides the capture and the rows they are fitted on."""
        return {k: getattr(self, k) for k in (*RangeOptions.model_fields, "seed")}

    def band_ratios(self) -> list[float]:
        """Likelihood ratios of the density bands: ``density_ratio`` and the sweep."""
        return sorted({float(self.density_ratio), *map(float, self.density_ratios)})
