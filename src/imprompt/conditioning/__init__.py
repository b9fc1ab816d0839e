"""The conditionings: every kind of thing a request adds to its pipeline call goes through the same four steps.

    plan(...)          -> the kind's `Conditioning`, or a refusal: everything that can be wrong with it, found from
                          the request and the files' tensor tables before anything loads (a module function: it
                          builds the object)
    prepare(prep)      -> what it needs, loaded and encoded through the engine's caches (`prep.state`)
    apply(call)        -> what it adds to the one pipeline call (`call.PipelineCall`): keyword arguments, another
                          pipeline, modules attached for the call and undone after it, a per-step schedule
    describe(call)     -> its part of the result's `info` and of A1111's infotext

The engine loops over a plan's conditionings in their order and knows none of their kinds; what differs between
model families is inside each kind (and the IP-Adapter attachment a pipeline is loaded with). They apply in plan
order, so a kind that changes what another reads comes first: image prompts add their FaceID adapters' own LoRAs
to the call before the LoRA set activates them, and the LoRAs act on the text encoders before the prompt is
encoded. One module a kind: `init_image`, `image_prompts` (the units, each an `ip_adapter` or a `faceid` unit),
`loras`, `vae`, `prompt`, `controlnet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Preparation:
    """What `prepare` works with: the engine's state (caches, budgets, the store), the request's loaded pipeline,
    the request's event list, and what was made elsewhere (a cluster's encoder workers: unit index -> embeddings)."""

    state: object  # state.EngineState
    loaded: object  # loading.resident.LoadedPipeline
    events: list
    made_elsewhere: dict = field(default_factory=dict)


@dataclass
class Description:
    """A conditioning's part of the result: `info` fields, A1111 infotext fields (ordered by `util.infotext`), text
    the infotext's prompt shows after the request's own (LoRAs given as a field, written as tags), warnings, and
    images the response carries after the generated ones (a ControlNet unit's control image, as the A1111
    ControlNet extension returns its detected maps)."""

    info: dict = field(default_factory=dict)
    infotext: dict = field(default_factory=dict)
    prompt_suffix: str = ""
    warnings: list = field(default_factory=list)
    images: list = field(default_factory=list)


class Conditioning:
    """One kind's planned part of a request (see the module docstring for the steps). `kind` names it in the
    result's timings."""

    kind = "conditioning"

    def prepare(self, prep: Preparation) -> None:
        """Load and encode what it needs (default: nothing)."""

    def apply(self, call) -> None:
        raise NotImplementedError

    def batch_part(self) -> tuple | None:
        """What every request of a batch must share for this kind (its part of `batching.batch_key`), or None when
        the kind, as planned, cannot run merged with other requests (the default: kinds say when they can)."""
        return None

    def describe(self, call) -> Description:
        raise NotImplementedError
