"""The files a transformer-alone model (ComfyUI's split layout) runs with: its VAE and text encoders, chosen.

A FLUX or SD 3.5 transformer in `models/diffusion_models/` holds neither VAE nor text encoders. Each part comes from
the request (`vae`, `text_encoders`) or, when not given, from the models folders: the file whose tensors fit the
role, and where tensors cannot tell (FLUX's and SD 3's VAEs have the same shapes) by ComfyUI's usual names, then
in the order the store resolves names in. What was chosen, and why, is part of the result's info, each part by a
name the store resolves to exactly that file (its stem where no other file has it, else its path under the models
folder: what a client or a cluster worker sends back gets the same file). A part that cannot be found, is of the
wrong kind, or is a GGUF text encoder (imprompt reads safetensors ones) is refused before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CheckpointError, IncompatibleError, MissingPartError, RequestError, UnsupportedError
from . import catalog
from .store import Entry, ModelStore, lookup_order


@dataclass(frozen=True)
class ModelParts:
    """role ("vae", "clip_l", "clip_g", "t5xxl") -> the store entry chosen for it, how it was chosen, and the name
    the store resolves to that very file (`ModelStore.name_of`)."""

    files: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)

    def key(self) -> tuple:
        """Part of the pipeline cache key: the same transformer with other parts is another pipeline."""
        return tuple((role, self.files[role].key()) for role in sorted(self.files))

    def describe(self) -> dict:
        """info["model_parts"]: role -> name (sent back in `vae` / `text_encoders`, it gives the same file), file,
        why, quantization."""
        return {role: {"name": self.name(role), "file": str(entry.path), "why": self.why.get(role, ""),
                       "quantization": getattr(entry.spec, "quantization", "")}
                for role, entry in sorted(self.files.items())}  # fmt: skip

    def name(self, role: str) -> str:
        return self.names.get(role, self.files[role].name)

    def fields(self) -> dict:
        """The request fields (`vae`, `text_encoders`) that name these very files: what the cluster's ingress
        forwards, so each worker plans the same parts."""
        fields: dict = {"vae": self.name("vae")} if "vae" in self.files else {}
        if self.files:
            fields["text_encoders"] = [self.name(role) for role in sorted(self.files) if role != "vae"]
        return fields


NO_PARTS = ModelParts()


# role -> what it is, in words; where ComfyUI keeps it; the request field that names it
ROLE_WORDS = {"vae": "VAE", "clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder", "t5xxl": "T5 text encoder"}
ROLE_FOLDERS = {"vae": "vae", "clip_l": "text_encoders", "clip_g": "text_encoders", "t5xxl": "text_encoders"}
# ComfyUI's usual file names, best first: a tie-break only among files whose tensors fit equally well
USUAL_NAMES = {
    "t5xxl": (lambda s: s == "t5xxl_fp16", lambda s: s.startswith("t5xxl_fp8_e4m3fn"), lambda s: "t5xxl" in s),
    "clip_l": (lambda s: s == "clip_l", lambda s: "clip_l" in s),
    "clip_g": (lambda s: s == "clip_g", lambda s: "clip_g" in s),
    ("vae", "flux"): (lambda s: s == "ae", lambda s: "flux" in s),
    ("vae", "sd3"): (lambda s: "sd3" in s or "sd35" in s,),
}  # fmt: skip
USUAL_FILES = {"t5xxl": "t5xxl_fp16.safetensors", "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
               ("vae", "flux"): "ae.safetensors", ("vae", "sd3"): "sd3.5_vae.safetensors"}  # fmt: skip


def choose_parts(model: Entry, store: ModelStore, vae: str | None, text_encoders: list[str]) -> ModelParts:
    """The VAE and text encoders a transformer alone runs with: those the request names (`vae`, `text_encoders`:
    each given the role its tensors say), the rest from the models folders (the file of that role whose widths
    fit the transformer's; ComfyUI's usual names break ties tensors cannot, then the store's order). NO_PARTS for a
    model that holds its own. Refused before anything loads: a part of the wrong kind or width, a GGUF text encoder,
    a part none fits."""
    spec = model.spec
    if not getattr(spec, "parts", ()):
        if text_encoders:
            raise RequestError(
                f"text_encoders: model {model.name} holds its own text encoders; text_encoders names the text encoders "
                f"of a transformer alone (ComfyUI's diffusion_models/). Leave the field out for this model"
            )
        return NO_PARTS
    need = _Needs(model)
    files, why = {}, {}
    if vae:
        files["vae"], why["vae"] = need.fitting_vae(need.named(store, vae, "vae")), "named in the request (vae)"
    given = [need.named(store, name, "text-encoder") for name in text_encoders]
    for entry in given:
        if _is_gguf(entry):
            raise need.gguf_refused(entry)
    for role, entry in need.roles_of(given).items():
        files[role], why[role] = entry, "named in the request (text_encoders)"
    for role in (*spec.parts, "t5xxl"):  # SD 3 runs without T5, and with one when the folders have it
        if role in files:
            continue
        taken = {e.path for e in files.values()}
        fitting = [e for e in need.candidates(role, store, files) if e.path not in taken and not _is_gguf(e)]
        if not fitting:
            if role in spec.parts:
                raise need.missing(role, store, files)
            continue
        files[role], why[role] = pick(role, need.architecture, sorted(fitting, key=lookup_order),
                                      need.requirement(role), store.name_of)  # fmt: skip
    return ModelParts(files, why, {role: store.name_of(entry) for role, entry in files.items()})


def pick(role: str, architecture: str, candidates: list[Entry], requirement: str, name_of=None) -> tuple[Entry, str]:
    """One of the files that fit a role (given in the store's `lookup_order`), and why it: the only one; else the
    best by ComfyUI's usual names (their tensors cannot tell them apart); else, as the store resolves a name
    several files share, the first .safetensors, the shallowest path. `name_of` says each file in `why`."""
    what, name_of = ROLE_WORDS[role], name_of or (lambda e: e.path.name)
    if len(candidates) == 1:
        return candidates[0], f"the only {what} that fits ({requirement}) in the models folders"
    usual = USUAL_NAMES.get(role) or USUAL_NAMES[(role, architecture)]
    ranks = [next((i for i, test in enumerate(usual) if test(e.path.stem.lower())), len(usual)) for e in candidates]
    best = min(ranks)
    chosen = candidates[ranks.index(best)]
    fit = f"{len(candidates)} {what}s fit ({requirement}): {', '.join(name_of(e) for e in candidates)}"
    order = "the store's order: .safetensors first, then the shallowest path"
    if best == len(usual):
        return chosen, f"the first by {order}, none having ComfyUI's usual names ({fit})"
    tied = f", the first of {ranks.count(best)} such by {order}" if ranks.count(best) > 1 else ""
    return chosen, f"ComfyUI's usual name {chosen.path.name}{tied} ({fit})"


class _Needs:
    """What a transformer alone needs of its parts, from its own tensors: the VAE's latent channels (SD 3: its
    input channels; FLUX: a quarter, it packs 2 x 2 latents), FLUX's CLIP width (its pooled input), SD 3's two
    CLIPs' pooled widths added up (and their hidden states, side by side, no wider than T5's), T5's width."""

    def __init__(self, model: Entry):
        self.model, spec = model, model.spec
        self.architecture = spec.architecture
        self.family = catalog.DIT_FAMILIES[spec.architecture]
        self.latent = spec.in_channels // 4 if spec.architecture == "flux" else spec.in_channels
        widths = dict(spec.text_encoder_widths)
        self.clip = widths.get("clip", 0)
        self.pooled = widths.get("clip_pooled", 0)
        self.t5 = widths.get("t5xxl", 0)
        self.text_roles = tuple(r for r in ("clip_l", "clip_g", "t5xxl") if r in spec.parts or r == "t5xxl")

    def __str__(self) -> str:
        return f"model {self.model.name} ({self.family} transformer alone)"

    def requirement(self, role: str) -> str:
        if role == "vae":
            return f"with {self.latent} latent channels"
        if role == "t5xxl":
            return f"{self.t5} wide"
        if self.architecture == "flux":
            return f"{self.clip} wide"
        return f"pairing with the other CLIP to a pooled width of {self.pooled}"

    # ---------------------------------------------------------------------------------- what the request names

    def named(self, store: ModelStore, name: str, kind: str) -> Entry:
        """The file a request's `vae` or `text_encoders` names; one of another kind is refused naming the field,
        what it needs and the files that fit (the store's own error would blame the file)."""
        try:
            return store.vae(name) if kind == "vae" else store.text_encoder(name)
        except CheckpointError:
            other = store.find(name)
            if other is None or other.spec is None or other.kind == kind:
                raise  # unreadable: the store's error says why
            field_, what = ("vae", "VAE") if kind == "vae" else ("text_encoders", "text encoder")
            roles = ("vae",) if kind == "vae" else self.text_roles
            needs = " and ".join(f"a {ROLE_WORDS[r]} {self.requirement(r)}" for r in roles)
            fitting = {store.name_of(e): None for r in roles for e in self.candidates(r, store, {}) if not _is_gguf(e)}
            raise IncompatibleError(
                f"{field_}: {name!r} is {other.path} ({_what(other)}), not a {what}: {self} reads {needs}. "
                f"Those in the models folders that fit: {', '.join(fitting) or 'none'}. Name one in {field_}, or "
                f"leave the field out to use one from the models folders"
            ) from None

    def gguf_refused(self, entry: Entry) -> UnsupportedError:
        """A GGUF text encoder (transformers' or llama.cpp's names): diffusers reads GGUF transformers only."""
        role = entry.spec.role
        usual = "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors" if role == "t5xxl" else \
            "clip_l.safetensors or clip_g.safetensors"  # fmt: skip
        return UnsupportedError(
            f"text_encoders: {entry.name} ({entry.path}) is a GGUF {ROLE_WORDS.get(role, 'CLIP text encoder')} "
            f"({entry.spec.quantization}), and imprompt reads text encoders from safetensors files only (diffusers "
            f"loads GGUF transformers, not GGUF text encoders). Use {usual} (ComfyUI's, in models/text_encoders/), "
            f"or leave it out to use one from the models folders"
        )

    def fitting_vae(self, entry: Entry) -> Entry:
        if entry.spec.latent_channels != self.latent:
            raise IncompatibleError(
                f"VAE {entry.name} ({entry.path}) has {entry.spec.latent_channels} latent channels "
                f"({entry.spec.family}), but {self} needs {self.latent}. Name a {self.family} VAE in vae, or leave "
                f"the field out to use one from the models folders"
            )
        return entry

    def roles_of(self, given: list[Entry]) -> dict[str, Entry]:
        """role -> each text encoder the request names, by what its tensors say (T5 or CLIP, and which CLIP)."""
        t5 = [e for e in given if e.spec.role == "t5xxl"]
        clips = [e for e in given if e.spec.role == "clip"]
        most = 1 if self.architecture == "flux" else 2
        if len(t5) > 1 or len(clips) > most:
            raise RequestError(
                f"text_encoders: {self} runs with one T5 and {most} CLIP text encoder{'s' if most > 1 else ''}, "
                f"the request names {len(t5)} T5 and {len(clips)} CLIP ({', '.join(e.name for e in given)})"
            )
        roles = {}
        for entry in t5:
            if entry.spec.width != self.t5:
                raise self.refused(entry, f"a T5 text encoder {entry.spec.width} wide", f"T5 {self.t5} wide")
            roles["t5xxl"] = entry
        if self.architecture == "flux":
            for entry in clips:
                if entry.spec.width != self.clip:
                    raise self.refused(entry, f"a CLIP text encoder {entry.spec.width} wide", f"CLIP-L {self.clip} wide")
                roles["clip_l"] = entry
            return roles
        if len(clips) == 2:
            first, second = clips
            if _pooled(first) + _pooled(second) != self.pooled:
                raise self.refused(first, f"a CLIP text encoder whose pooled width {_pooled(first)}, with "
                                          f"{second.name}'s {_pooled(second)}, makes {_pooled(first) + _pooled(second)}",
                                   f"two CLIPs whose pooled widths make {self.pooled}")  # fmt: skip
            narrow, wide = sorted(clips, key=lambda e: (e.spec.width, _says_clip_g(e)))
            roles.update(clip_l=narrow, clip_g=wide)
        elif clips:
            (entry,) = clips
            other = self.pooled - _pooled(entry)
            if other <= 0:
                raise self.refused(entry, f"a CLIP text encoder of pooled width {_pooled(entry)}",
                                   f"two CLIPs whose pooled widths make {self.pooled}")  # fmt: skip
            wider = _pooled(entry) > other or (_pooled(entry) == other and _says_clip_g(entry))
            roles["clip_g" if wider else "clip_l"] = entry
        return roles

    def refused(self, entry: Entry, found: str, expected: str) -> IncompatibleError:
        return IncompatibleError(
            f"text encoder {entry.name} ({entry.path}) is {found}, but {self} reads {expected}. Name one that fits "
            f"in text_encoders, or leave it out to use one from the models folders"
        )

    # ---------------------------------------------------------------------------------- what the folders hold

    def candidates(self, role: str, store: ModelStore, chosen: dict[str, Entry]) -> list[Entry]:
        """The files in the models folders whose tensors fit `role`, given the parts chosen so far."""
        if role == "vae":
            return [e for e in store.current_of_kind("vae") if e.spec.latent_channels == self.latent]
        encoders = store.current_of_kind("text-encoder")
        if role == "t5xxl":
            return [e for e in encoders if e.spec.role == "t5xxl" and e.spec.width == self.t5]
        clips = [e for e in encoders if e.spec.role == "clip"]
        if self.architecture == "flux":
            return [e for e in clips if e.spec.width == self.clip]
        if role == "clip_g" and "clip_l" in chosen:  # the partner of the chosen CLIP-L: at least as wide
            return [e for e in clips if self.pair(chosen["clip_l"], e)]
        if role == "clip_l" and "clip_g" in chosen:
            return [e for e in clips if self.pair(e, chosen["clip_g"])]
        return [e for e in clips if any(self.pair(e, other) for other in clips)]

    def pair(self, narrow: Entry, wide: Entry) -> bool:
        """Whether two CLIPs make SD 3's pair: different files, the first no wider, pooled widths that add up to
        the transformer's, hidden states that fit side by side in T5's width (diffusers pads them to it)."""
        return (narrow.path != wide.path and narrow.spec.width <= wide.spec.width
                and _pooled(narrow) + _pooled(wide) == self.pooled
                and narrow.spec.width + wide.spec.width <= self.t5)  # fmt: skip

    def missing(self, role: str, store: ModelStore, chosen: dict[str, Entry]) -> MissingPartError:
        usual = USUAL_FILES.get(role) or USUAL_FILES[(role, self.architecture)]
        passed = [e.path.name for e in self.candidates(role, store, chosen) if _is_gguf(e)]
        gguf = (f" GGUF text encoders are passed over (imprompt reads safetensors ones): {', '.join(passed)}."
                if passed else "")  # fmt: skip
        if role == "vae":
            found = [f"{e.path.name} ({e.spec.latent_channels} latent channels)" for e in store.of_kind("vae")]
            field_ = "vae"
        else:
            found = [f"{e.path.name} ({e.spec.family})" for e in store.of_kind("text-encoder")]
            field_ = "text_encoders"
        return MissingPartError(
            f"{self} needs a {ROLE_WORDS[role]} {self.requirement(role)} from another file, and none in the models "
            f"folders fits (found: {', '.join(found) or 'none'}).{gguf} Put {usual} in models/{ROLE_FOLDERS[role]}/, or name "
            f"one in {field_}"
        )


def _is_gguf(entry: Entry) -> bool:
    return entry.path.suffix == ".gguf" or getattr(entry.spec, "quantization", "").startswith("gguf_")


def _what(entry: Entry) -> str:
    """What a file is, in words: "a VAE", "a T5 text encoder", "a lora"."""
    if entry.kind == "vae":
        return "a VAE"
    if entry.kind == "text-encoder":
        return f"a {'T5' if entry.spec.role == 't5xxl' else 'CLIP'} text encoder"
    return f"{'an' if entry.kind[0] in 'aeiou' else 'a'} {entry.kind}"


def _pooled(entry: Entry) -> int:
    """A CLIP's pooled width as SD 3 reads it: its projection's, or its own where it has none (CLIP-L's is read
    unprojected)."""
    return entry.spec.projection or entry.spec.width


def _says_clip_g(entry: Entry) -> bool:
    """Where two CLIPs are equally wide (tensors cannot tell which is which): ComfyUI's name says."""
    return "clip_g" in entry.path.stem.lower()
