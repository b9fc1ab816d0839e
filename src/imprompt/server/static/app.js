// imprompt's page: plain JavaScript over the HTTP API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
let listing = null;          // GET /v1/models
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

function currentModel() {
  return listing.models.find((m) => m.name === $("model").value);
}

function showFamily() {
  const model = currentModel();
  const layers = model && model.architecture !== "unet" ? "blocks that take image prompts" : "cross-attention layers";
  $("model-family").textContent = model ? `${model.family}, ${model.cross_attention_layers} ${layers}` : "";
  $("true-cfg-field").hidden = !(model && model.architecture === "flux");
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
    const encoder = adapter.encoder_present ? adapter.encoder : "no encoder present";
    select.add(new Option(`${name} — needs ${adapter.needs} → ${encoder}`, name));
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  describeAdapter(select);
}

function describeAdapter(select) {
  const adapter = listing.adapters.find((a) => (a.friendly_name || a.name) === select.value);
  const needs = select.closest(".unit").querySelector(".needs");
  needs.textContent = adapter
    ? `${adapter.variant}, ${adapter.tokens} tokens; encoder: ${adapter.encoder || adapter.encoder_problem}`
    : "no adapter fits this model";
  // FaceID Plus v2's face-structure weight (SD.Next's "Structure"); it means nothing to other adapters
  select.closest(".unit").querySelector(".structure-field").hidden = !(adapter && adapter.faceid_version === "v2");
}

function refreshAdapterLists() {
  document.querySelectorAll(".unit .adapter").forEach(fillAdapterSelect);
  fillLoraPicker();
}

// The LoRAs that fit the model (their cross-attention width, read from their tensors); picking one writes
// A1111's tag into the prompt, where its weight can be edited, as A1111's LoRA cards do.
function fillLoraPicker() {
  const model = currentModel();
  const select = $("lora-picker");
  // SD 3.5 / FLUX: imprompt runs no LoRA on them yet (the plan refuses it), so none is offered
  const loras = (listing.other.lora || []).filter((l) => model && model.architecture === "unet"
    && (l.width == null || l.width === model.cross_attention_dim));
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
    start: Number(unit.querySelector(".start").value),
    end: Number(unit.querySelector(".end").value),
  };
  if (!unit.querySelector(".structure-field").hidden) payload.structure = Number(unit.querySelector(".structure").value);
  const mask = unit.querySelector(".mask").files[0];
  if (mask) payload.masks = [await fileToBase64(mask)];
  return payload;
}

// ----------------------------------------------------------------------------------------------- generate

async function generate() {
  $("error").textContent = "";
  $("generate").disabled = true;
  const units = (await Promise.all([...document.querySelectorAll(".unit")].map(unitPayload))).filter(Boolean);
  const payload = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    seed: Number($("seed").value),
    steps: Number($("steps").value),
    width: Number($("width").value),
    height: Number($("height").value),
    cfg_scale: Number($("cfg").value),
    ...(currentModel()?.architecture === "flux" ? { true_cfg_scale: Number($("true-cfg").value) } : {}),
    override_settings: { sd_model_checkpoint: $("model").value },
    ip_adapter: units,
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
    const units = info.ip_adapters.map((u) => `${u.adapter} ← ${u.encoder} (${u.encoder_source})`).join("\n");
    const loras = info.loras.length ? `\nLoRAs: ${info.loras.map((l) => `${l.name} (${l.weight})`).join(", ")}` : "";
    caption.textContent = `${info.infotexts[i]}\n${units}${loras}${schedule(info.prompt_schedule)}`;
    figure.append(img, caption);
    // FaceID units: the aligned face crop InsightFace found in each reference image
    info.ip_adapters.forEach((u, n) => (u.faces || []).forEach((face, j) => {
      const crop = document.createElement("img");
      crop.className = "face-crop";
      crop.src = `data:image/png;base64,${face.crop}`;
      crop.alt = `face used by unit ${n + 1}, image ${j + 1} (detection score ${face.score.toFixed(2)})`;
      crop.title = crop.alt;
      figure.append(crop);
    }));
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
    case "model_unloaded": return ["model unloaded", `${e.model}: ${e.why}`];
    case "model_reused": return ["model resident", `${e.model}: no reload`];
    case "model_offloaded": return ["model to CPU memory", `${e.model}: ${e.why}`];
    case "model_restored": return ["model back from CPU memory", e.model];
    case "component_shared": return ["component shared", `${e.model}: ${e.component} (same files as a resident model)`];
    case "lora_loaded": return ["LoRA loaded", `${e.lora}${seconds}`];
    case "lora_evicted": return ["LoRA unloaded", `${e.lora}: ${e.why}`];
    case "vae_loaded": return ["VAE loaded", `${e.vae}${seconds}`];
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
$("generate").onclick = generate;
$("lora-picker").onchange = addLoraTag;
$("model").onchange = async () => {
  await api("/sdapi/v1/options", { method: "POST", body: JSON.stringify({ sd_model_checkpoint: $("model").value }) });
  showFamily();
  refreshAdapterLists();
};
loadModels().then(() => { addUnit(); return updateEvents(); }).catch((error) => { $("error").textContent = error.message; });
