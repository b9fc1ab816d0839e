// imprompt's page: plain JavaScript over the HTTP API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
let listing = null;          // GET /v1/models
let modules = ["none"];      // GET /controlnet/module_list: the preprocessors that can run here
let defaultScale = 0.7;      // a new unit's scale; a model's own defaults (imprompt.json) may change it
let lastEventTime = 0;       // newest event shown

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body && body.detail ? `${response.status}: ${body.detail}` : `HTTP ${response.status}`);
  return body;
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);  // a data: URL; the server accepts the prefix
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------------------------------------- models

async function loadModels() {
  listing = await api("/v1/models");
  const select = $("model");
  select.innerHTML = "";
  for (const model of listing.models) {
    const label = model.unsupported ? `${model.name} (${model.model_type || model.pipeline_class}: not runnable)`
                                    : `${model.name} (${model.family})`;
    const option = new Option(label, model.name, false, model.name === listing.current_model);
    option.disabled = Boolean(model.unsupported);
    option.title = model.unsupported || "";
    select.add(option);
  }
  showFamily();
  refreshAdapterLists();
}

// The preprocessors whose weights are present (the server leaves out the others), "none" first: the image is then
// the finished control map.
async function loadModules() {
  const names = (await api("/controlnet/module_list")).module_list;
  modules = ["none", ...names.filter((name) => name !== "none")];
}

// A transformer alone (ComfyUI's split FLUX / SD 3.5): one choice per part it needs, "Automatic" (the file the
// server finds in the models folders) first; the choices travel as Forge's `forge_additional_modules`.
const PART_LABELS = { vae: "VAE", clip_l: "CLIP-L", clip_g: "CLIP-G", t5xxl: "T5" };

function partCandidates(role) {
  const other = listing.other || {};
  if (role === "vae") return (other.vae || []).filter((v) => v.latent_channels === 16);
  const wanted = role === "t5xxl" ? "t5xxl" : "clip";
  return (other["text-encoder"] || []).filter((t) => t.role === wanted);
}

function showParts(model) {
  const box = $("model-parts");
  box.innerHTML = "";
  const parts = (model && model.parts) || [];
  box.hidden = parts.length === 0;
  for (const role of parts) {
    const label = document.createElement("label");
    label.textContent = `${PART_LABELS[role] || role} `;
    const select = document.createElement("select");
    select.className = "model-part";
    select.dataset.role = role;
    select.add(new Option("Automatic", ""));
    for (const file of partCandidates(role)) {
      const name = file.path.split(/[\\/]/).pop();
      select.add(new Option(file.quantization ? `${name} (${file.quantization})` : name, name));
    }
    label.append(select);
    box.append(label);
  }
}

function chosenParts() {
  return [...document.querySelectorAll(".model-part")].map((s) => s.value).filter(Boolean);
}

function currentModel() {
  return listing.models.find((m) => m.name === $("model").value);
}

function showFamily() {
  const model = currentModel();
  const layers = model && model.architecture !== "unet" ? "blocks that take image prompts" : "cross-attention layers";
  $("model-family").textContent = model ? `${model.family}, ${model.cross_attention_layers} ${layers}` : "";
  $("true-cfg-field").hidden = !(model && model.architecture === "flux");
  showParts(model);
  if (model) { $("width").value = model.default_size; $("height").value = model.default_size; applyDefaults(model); }
}

// The settings a model's maker suggests (its imprompt.json; the trained demo model's: empty prompt, CFG 1.5,
// scale 1). Switching to a model that suggests nothing puts back the page's own starting values for those fields.
const SUGGESTIBLE = { prompt: "prompt", negative_prompt: "negative-prompt", steps: "steps", cfg_scale: "cfg",
                      width: "width", height: "height" };
const PAGE_DEFAULT_SCALE = 0.7;
let pageDefaults = null;     // the form's values as the page was loaded
let suggested = {};          // what the current model's defaults set

function applyDefaults(model) {
  if (pageDefaults === null) {
    pageDefaults = Object.fromEntries(Object.values(SUGGESTIBLE).map((id) => [id, $(id).value]));
  }
  const defaults = model.defaults || {};
  for (const key of Object.keys(suggested)) {
    if (key in SUGGESTIBLE && !(key in defaults)) $(SUGGESTIBLE[key]).value = pageDefaults[SUGGESTIBLE[key]];
  }
  for (const [key, value] of Object.entries(defaults)) {
    if (key in SUGGESTIBLE) $(SUGGESTIBLE[key]).value = value;
  }
  if ("ip_scale" in defaults || "ip_scale" in suggested) {
    defaultScale = defaults.ip_scale ?? PAGE_DEFAULT_SCALE;
    document.querySelectorAll(".unit .scale").forEach((input) => { input.value = defaultScale; });
  }
  suggested = defaults;
}

function adaptersForModel() {
  const model = currentModel();
  return listing.adapters.filter((a) => model && a.fits_models.includes(model.name));
}

function fillAdapterSelect(select) {
  const previous = select.value;
  select.innerHTML = "";
  for (const adapter of adaptersForModel()) {
    const name = adapter.friendly_name || adapter.name;
    const encoder = adapter.encoder_present ? adapter.encoder : `no ${adapter.face_pack || "encoder"} present`;
    // InstantX ships InstantID as a plain ip-adapter.bin: the kind is named where the file's name does not say it
    const shown = !adapter.friendly_name && KIND_NAMES[adapter.variant] ? `${KIND_NAMES[adapter.variant]} (${name})` : name;
    const net = adapter.variant === "instantid" ? ` + IdentityNet ${adapter.identitynet || "missing"}` : "";
    select.add(new Option(`${shown} — needs ${adapter.needs} → ${encoder}${net}`, name));
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  describeAdapter(select);
}

const KIND_NAMES = { instantid: "InstantID", redux: "FLUX Redux" };

// What the unit needs and the fields its kind reads: Redux adds tokens to the prompt at every step (no window, no
// mask; a downsampling factor), InstantID reads one face (no mask; its IdentityNet's weight and a pose image), PuLID one face (no mask).
function describeAdapter(select) {
  const unit = select.closest(".unit");
  const adapter = listing.adapters.find((a) => (a.friendly_name || a.name) === select.value);
  const variant = adapter ? adapter.variant : "";
  let text = "no adapter fits this model";
  if (variant === "redux") {
    text = `redux: each image's tokens appended to the prompt's T5 tokens; encoder: ${adapter.encoder || adapter.encoder_problem}`;
  } else if (variant === "instantid") {
    const pack = adapter.face_pack_present ? `InsightFace ${adapter.face_pack}`
      : `InsightFace ${adapter.face_pack} missing: put the pack in models/insightface/models/${adapter.face_pack}/`;
    const net = adapter.identitynet || `missing (${adapter.identitynet_problem || "no IdentityNet found"})`;
    text = `instantid, ${adapter.tokens} tokens; face: ${pack}; IdentityNet: ${net}`;
  } else if (adapter) {
    text = `${adapter.variant}, ${adapter.tokens} tokens; encoder: ${adapter.encoder || adapter.encoder_problem}`;
  }
  unit.querySelector(".needs").textContent = text;
  // FaceID Plus v2's face-structure weight (SD.Next's "Structure"); it means nothing to other adapters
  unit.querySelector(".structure-field").hidden = !(adapter && adapter.faceid_version === "v2");
  unit.querySelector(".downsample-field").hidden = variant !== "redux";
  unit.querySelector(".identitynet-field").hidden = variant !== "instantid";
  unit.querySelector(".pose-field").hidden = variant !== "instantid";
  unit.querySelectorAll(".window-field").forEach((field) => { field.hidden = variant === "redux"; });
  unit.querySelector(".mask-field").hidden = ["redux", "instantid", "pulid", "pulid-sdxl"].includes(variant);
}

function refreshAdapterLists() {
  document.querySelectorAll(".unit .adapter").forEach(fillAdapterSelect);
  document.querySelectorAll(".control-unit .cn-model").forEach(fillControlNetSelect);
  fillLoraPicker();
}

// The LoRAs that fit the model (family and width, read from their tensors); picking one writes
// A1111's tag into the prompt, where its weight can be edited, as A1111's LoRA cards do.
function fillLoraPicker() {
  const model = currentModel();
  const select = $("lora-picker");
  // the models each LoRA fits come from the server, by the plan's own check (SD 1.5 / SDXL / SD 3.5 / FLUX)
  const loras = (listing.other.lora || []).filter((l) => model && (l.fits_models || []).includes(model.name));
  select.innerHTML = "";
  select.add(new Option(loras.length ? "add a LoRA to the prompt…" : "no LoRA fits this model", ""));
  for (const lora of loras) select.add(new Option(`${lora.name} (${lora.family}, rank ${lora.rank ?? "?"})`, lora.name));
}

function addLoraTag() {
  const name = $("lora-picker").value;
  if (!name) return;
  const prompt = $("prompt");
  prompt.value = `${prompt.value.trimEnd()} <lora:${name}:1>`.trimStart();
  $("lora-picker").value = "";
}

// -------------------------------------------------------------------------------------------------- units

function addUnit() {
  const units = $("units");
  if (units.children.length >= 4) return;
  const unit = $("unit-template").content.firstElementChild.cloneNode(true);
  unit.querySelector(".remove").onclick = () => { unit.remove(); numberUnits(); };
  const select = unit.querySelector(".adapter");
  unit.querySelector(".scale").value = defaultScale;
  select.onchange = () => describeAdapter(select);
  unit.querySelector(".images").onchange = (event) => showPreviews(unit, event.target.files);
  units.appendChild(unit);
  fillAdapterSelect(select);
  numberUnits();
}

function numberUnits() {
  document.querySelectorAll(".unit").forEach((unit, i) => { unit.querySelector(".unit-number").textContent = i + 1; });
  $("add-unit").disabled = $("units").children.length >= 4;
}

function showPreviews(unit, files) {
  const previews = unit.querySelector(".previews");
  previews.innerHTML = "";
  for (const file of files) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    previews.appendChild(img);
  }
}

async function unitPayload(unit) {
  const files = [...unit.querySelector(".images").files];
  if (!files.length) return null;  // a unit without images is left out, as SD.Next does
  const payload = {
    adapter: unit.querySelector(".adapter").value,
    images: await Promise.all(files.map(fileToBase64)),
    scale: Number(unit.querySelector(".scale").value),
  };
  const shown = (field) => !unit.querySelector(field).hidden;  // a hidden field is one the adapter does not read
  if (shown(".window-field")) {
    payload.start = Number(unit.querySelector(".start").value);
    payload.end = Number(unit.querySelector(".end").value);
  }
  if (shown(".structure-field")) payload.structure = Number(unit.querySelector(".structure").value);
  if (shown(".downsample-field") && Number(unit.querySelector(".downsample").value) > 1) {
    payload.downsample = Number(unit.querySelector(".downsample").value);
  }
  if (shown(".identitynet-field")) payload.controlnet_scale = Number(unit.querySelector(".controlnet-scale").value);
  const pose = unit.querySelector(".pose-image").files[0];
  if (pose && shown(".pose-field")) payload.pose_image = await fileToBase64(pose);
  const mask = unit.querySelector(".mask").files[0];
  if (mask && shown(".mask-field")) payload.masks = [await fileToBase64(mask)];
  return payload;
}

// ---------------------------------------------------------------------------------------- ControlNet units

const MAX_CONTROL_UNITS = 4;

function addControlUnit() {
  const units = $("control-units");
  if (units.children.length >= MAX_CONTROL_UNITS) return;
  const unit = $("control-template").content.firstElementChild.cloneNode(true);
  unit.querySelector(".remove").onclick = () => { unit.remove(); numberControlUnits(); };
  const moduleSelect = unit.querySelector(".module");
  for (const name of modules) moduleSelect.add(new Option(name, name));
  const select = unit.querySelector(".cn-model");
  select.onchange = () => describeControlNet(select);
  unit.querySelector(".control-image").onchange = (event) => showPreviews(unit, event.target.files);
  units.appendChild(unit);
  fillControlNetSelect(select);
  numberControlUnits();
}

function numberControlUnits() {
  document.querySelectorAll(".control-unit").forEach((unit, i) => {
    unit.querySelector(".control-number").textContent = i + 1;
  });
  $("add-control").disabled = $("control-units").children.length >= MAX_CONTROL_UNITS;
}

// The ControlNets that fit the selected model (the server read each one's family from its tensors).
function fillControlNetSelect(select) {
  const previous = select.value;
  const model = currentModel();
  const names = (model && model.controlnets) || [];
  select.innerHTML = "";
  for (const name of names) {
    const net = listing.controlnets.find((c) => c.name === name);
    select.add(new Option(net ? `${name} — ${net.detail}` : name, name));
  }
  if (!names.length) select.add(new Option("no ControlNet fits this model", ""));
  if ([...select.options].some((o) => o.value === previous && previous)) select.value = previous;
  describeControlNet(select);
}

// A Union / ProMax model is told which control type its image is: by default the one the preprocessor names.
function describeControlNet(select) {
  const unit = select.closest(".control-unit");
  const net = listing.controlnets.find((c) => c.name === select.value);
  unit.querySelector(".cn-detail").textContent = net ? `${net.family}` : "";
  const union = Boolean(net && net.union);
  unit.querySelector(".union-field").hidden = !union;
  const types = unit.querySelector(".union-type");
  types.innerHTML = "";
  types.add(new Option("from the preprocessor", ""));
  if (union) net.control_types.forEach((type, i) => types.add(new Option(type, String(i))));
}

async function controlPayload(unit, n) {
  const file = unit.querySelector(".control-image").files[0];
  const model = unit.querySelector(".cn-model").value;
  // a unit the person added is sent or refused, never dropped in silence
  if (!file) throw new Error(`ControlNet ${n + 1}: no control image; upload one or remove the unit`);
  if (!model) throw new Error(`ControlNet ${n + 1}: no ControlNet fits ${$("model").value}; remove the unit or pick another model`);
  const payload = {
    model,
    image: await fileToBase64(file),
    module: unit.querySelector(".module").value,
    weight: Number(unit.querySelector(".cn-weight").value),
    start: Number(unit.querySelector(".cn-start").value),
    end: Number(unit.querySelector(".cn-end").value),
    control_mode: unit.querySelector(".control-mode").value,
  };
  const type = unit.querySelector(".union-type").value;
  if (!unit.querySelector(".union-field").hidden && type !== "") payload.union_type = Number(type);
  return payload;
}

// ----------------------------------------------------------------------------------------------- generate

async function generate() {
  $("error").textContent = "";
  $("generate").disabled = true;
  let units, controlnets;
  try {
    units = (await Promise.all([...document.querySelectorAll(".unit")].map(unitPayload))).filter(Boolean);
    controlnets = await Promise.all([...document.querySelectorAll(".control-unit")].map(controlPayload));
  } catch (error) {
    $("error").textContent = error.message;
    $("generate").disabled = false;
    return;
  }
  const payload = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    seed: Number($("seed").value),
    steps: Number($("steps").value),
    width: Number($("width").value),
    height: Number($("height").value),
    cfg_scale: Number($("cfg").value),
    ...(currentModel()?.architecture === "flux" ? { true_cfg_scale: Number($("true-cfg").value) } : {}),
    override_settings: { sd_model_checkpoint: $("model").value,
                         ...(chosenParts().length ? { forge_additional_modules: chosenParts() } : {}) },
    ip_adapter: units,
    controlnets,  // imprompt's own form; their control maps come back in `control_images`
  };
  const poll = setInterval(updateProgress, 300);
  try {
    const result = await api("/sdapi/v1/txt2img", { method: "POST", body: JSON.stringify(payload) });
    showResult(result);
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    clearInterval(poll);
    $("progress").value = 0;
    $("generate").disabled = false;
    await updateEvents();
  }
}

async function updateProgress() {
  try { $("progress").value = (await api("/sdapi/v1/progress")).progress; } catch (error) { /* shown on completion */ }
}

// What a prompt with [from:to:when], [a|b] or AND made of each step (SD 1.5 / SDXL): shown when it changes.
function schedule(prompts) {
  if (!prompts) return "";
  const lines = [];
  const texts = (name, entries) => entries.forEach((e) => lines.push(`${name} steps ${e.steps[0]}-${e.steps[1]}: ${e.text}`));
  prompts.prompt.forEach((part, n) => {
    if (prompts.prompt.length > 1 || part.texts.length > 1 || part.weight !== 1) {
      texts(prompts.prompt.length > 1 ? `part ${n + 1} (weight ${part.weight})` : "prompt", part.texts);
    }
  });
  if (prompts.negative_prompt.length > 1) texts("negative", prompts.negative_prompt);
  return lines.length ? `\nschedule:\n${lines.join("\n")}` : "";
}

function showResult(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((image, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${image}`;
    img.alt = `seed ${info.all_seeds[i]}`;
    const caption = document.createElement("figcaption");
    // PuLID's info has no encoder_source: whether its ID tokens were computed or came from the cache
    const units = info.ip_adapters.map((u) => `${u.adapter} ← ${u.encoder} (${u.encoder_source ?? `ID tokens: ${u.face?.id_tokens}`})`
      + (u.identitynet ? ` + IdentityNet ${u.identitynet} (weight ${u.controlnet_scale})` : "")).join("\n");
    const controls = (info.controlnets || []).map((c, n) => `ControlNet ${n + 1}: ${c.model} ← ${c.module} `
      + `(weight ${c.weight}, window ${c.start}-${c.end}, ${c.control_mode})`).join("\n");
    const loras = info.loras.length ? `\nLoRAs: ${info.loras.map((l) => `${l.name} (${l.weight})`).join(", ")}` : "";
    const parts = Object.entries(info.model_parts || {}).map(([role, p]) => `\n${PART_LABELS[role] || role}: ${p.name} (${p.why})`).join("");
    caption.textContent = `${info.infotexts[i]}\n${units}${controls ? `\n${controls}` : ""}${loras}${parts}`
      + schedule(info.prompt_schedule);
    figure.append(img, caption);
    // ControlNet units: the control map each one used (the preprocessor's result, or the image given with none)
    (result.control_images || []).forEach((map, n) => {
      const shown = document.createElement("img");
      shown.className = "control-map";
      shown.src = `data:image/png;base64,${map}`;
      const unit = (info.controlnets || [])[n];
      shown.alt = `control map of ControlNet ${n + 1}${unit ? ` (${unit.module})` : ""}`;
      shown.title = shown.alt;
      figure.append(shown);
    });
    // FaceID / InstantID units: the aligned face crop InsightFace found in each reference image
    info.ip_adapters.forEach((u, n) => (u.faces || []).forEach((face, j) => {
      const crop = document.createElement("img");
      crop.className = "face-crop";
      crop.src = `data:image/png;base64,${face.crop}`;
      crop.alt = `face used by unit ${n + 1}, image ${j + 1} (detection score ${face.score.toFixed(2)})`;
      crop.title = crop.alt;
      figure.append(crop);
    }));
    // InstantID units: the face keypoints drawn as InstantID draws them, the IdentityNet's control image
    info.ip_adapters.forEach((u, n) => {
      if (!u.keypoints) return;
      const kps = document.createElement("img");
      kps.className = "face-keypoints";
      kps.src = `data:image/png;base64,${u.keypoints}`;
      kps.alt = `keypoints read by unit ${n + 1}'s IdentityNet ${u.identitynet}${u.pose_image ? " (from the pose image)" : ""}`;
      kps.title = kps.alt;
      figure.append(kps);
    });
    $("gallery").prepend(figure);
  });
}

// ------------------------------------------------------------------------------------------------- events

function describeEvent(e) {
  const seconds = e.seconds !== undefined ? ` in ${e.seconds.toFixed(2)} s` : "";
  switch (e.event) {
    case "encoder_loaded": return ["encoder loaded", `${e.encoder} for ${e.for}${seconds}: ${e.why}`];
    case "encoder_reused": return ["encoder reused", `${e.encoder} for ${e.for}`];
    case "encoder_evicted": return ["encoder evicted", `${e.encoder}: ${e.why}`];
    case "cache_hit": return ["cache hit", `${e.what} from ${e.encoder} for ${e.for}`];
    case "adapter_loaded": return ["adapter loaded", `${e.adapter}${seconds}`];
    case "face_analysis_loaded": return ["face analysis loaded", `InsightFace from ${e.pack}${seconds}`];
    case "adapters_attached": return ["UNet adapters", e.adapters.join(" + ") || "none"];
    case "model_loaded": return ["model loaded", `${e.model}${seconds}`];
    case "memory_plan": return [`memory plan: ${e.plan}`, `${e.model}: ${e.why}`];
    case "model_unloaded": return ["model unloaded", `${e.model}: ${e.why}`];
    case "model_reused": return ["model resident", `${e.model}: no reload`];
    case "model_offloaded": return ["model to CPU memory", `${e.model}: ${e.why}`];
    case "model_restored": return ["model back from CPU memory", e.model];
    case "component_shared": return ["component shared", `${e.model}: ${e.component} (same files as a resident model)`];
    case "lora_loaded": return ["LoRA loaded", `${e.lora}${seconds}`];
    case "lora_evicted": return ["LoRA unloaded", `${e.lora}: ${e.why}`];
    case "vae_loaded": return ["VAE loaded", `${e.vae}${seconds}`];
    case "controlnet_loaded": return ["ControlNet loaded", `${e.controlnet} for ${e.unit}${seconds}`];
    case "controlnet_evicted": return ["ControlNet unloaded", `${e.controlnet}: ${e.why}`];
    case "control_detected": return ["control map made", `${e.module} for ControlNet ${e.unit + 1}${seconds}`];
    case "request_refused": return ["refused", e.why];
    default: return [e.event, JSON.stringify(e)];
  }
}

async function updateEvents() {
  const events = await api(`/v1/events?since=${lastEventTime}`);
  for (const e of events) {
    const [kind, text] = describeEvent(e);
    const li = document.createElement("li");
    li.className = e.event;
    li.innerHTML = `<span class="kind"></span> <span class="text"></span>`;
    li.querySelector(".kind").textContent = kind;
    li.querySelector(".text").textContent = text;
    $("events").prepend(li);
    lastEventTime = Math.max(lastEventTime, e.time);
  }
}

// ---------------------------------------------------------------------------------------------------- start

$("add-unit").onclick = addUnit;
$("add-control").onclick = addControlUnit;
$("generate").onclick = generate;
$("lora-picker").onchange = addLoraTag;
$("model").onchange = async () => {
  await api("/sdapi/v1/options", { method: "POST", body: JSON.stringify({ sd_model_checkpoint: $("model").value }) });
  showFamily();
  refreshAdapterLists();
};
Promise.all([loadModels(), loadModules()]).then(() => { addUnit(); return updateEvents(); }).catch((error) => { $("error").textContent = error.message; });
