"""SimpleTuner's files, read as minicat's config: a `config.json` (or a TOML with its keys) and the
`multidatabackend.json` it names in `data_backend_config`.

`read` turns a SimpleTuner mapping into minicat's keys and says what became of every key, before
any work: used as it is, renamed, the same as what minicat does anyway, ignored with a warning (it
does not change the trained adapter: hub uploads, trackers, batch sizes of the caching pass), or
refused (it would change the result: another optimizer, a Hugging Face dataset, a prompt prefix).
All refusals come back together, so a file is fixed in one run, not one key per run.

What SimpleTuner does with its files, followed here (bghira/SimpleTuner, snapshot bc8e6ab):
- keys may carry a `--` prefix; `null` means unset; numbers and booleans may be strings
  (`config/config.json.example`; `configuration/cli_utils.py` `mapping_to_cli_args`);
- legacy names are forwarded: `checkpointing_steps` -> `checkpoint_step_interval`,
  `validation_steps` -> `validation_step_interval`, `save_total_limit` ->
  `checkpoints_total_limit` (`cli_utils.py` `_LEGACY_ARG_HANDLERS`); minicat keeps the legacy
  spelling as its own name and reads both;
- `cosine_with_warmup` is an alias of `cosine` (`cli_utils.py` `normalize_lr_scheduler_value`);
- a dataset's strings expand `{model_family}`, `{output_dir}`, `{id}` and `{env:NAME}`
  (`data_backend/factory.py` `fill_variables_in_config_paths`, `configuration/template_vars.py`);
  the config's own strings expand `{env:NAME}` only. minicat refuses any other `{name}` in a
  dataset, where SimpleTuner would make a folder literally called `{name}`.
This file imports nothing of minicat's: config.py calls it with the names of its own keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# SimpleTuner's current name -> minicat's (SimpleTuner's legacy) name.
RENAMED = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "save_total_limit": "checkpoints_total_limit",
    "text_encoder_1_precision": "text_encoder_precision",
    "peft_lora_target_modules": "lora_targets",  # a list, or a JSON list as text or in a file
}
# SimpleTuner's quantization names that are minicat's modes under another name.
PRECISIONS = {
    "int8-torchao": "int8",
    "fp8-quanto": "fp8",
}
# attention_mechanism -> attention_backend (torch's SDPA kernels; the others are not in minicat).
ATTENTION = {
    "diffusers": "auto",
    "native-flash": "flash",
    "native-efficient": "efficient",
    "native-cudnn": "cudnn",
    "native-math": "math",
}
# SimpleTuner's AdamW names: the same algorithm as minicat's torch AdamW.
ADAMW = ("adamw", "adamw_torch", "adamw_bf16")  # not adamw_schedulefree: another algorithm
NO_UPLOAD = "minicat uploads nothing; share output_dir/pytorch_lora_weights.safetensors yourself"
NO_TRACKER = "minicat logs to output_dir/loss.jsonl and loss.png, no tracker"
MEMORY = "memory only: the trained adapter is the same"
ONE_ORDER = "minicat samples every dataset by its size, in seeded random order"

# Top-level keys minicat has no key for: (values that are what minicat does anyway, or None;
# "warn" = the adapter is the same, the run goes on | "stop" = it would differ, the run stops;
# why). A value among the first is silent; any other gets the reason.
KEYS = {
    "model_family": (("longcat_image",), "stop", "minicat trains LongCat-Image only"),
    "model_type": (("lora",), "stop", "minicat trains adapters (LoRA, LoKr) only"),
    "optimizer": (ADAMW[:2], "stop", "minicat's optimizer is AdamW (adam_beta1, adam_beta2, ...)"),
    "grad_clip_method": (
        ("norm",),
        "stop",
        "minicat clips the gradient's norm to max_grad_norm; 'value' clips each element: "
        'set grad_clip_method = "norm"',
    ),
    "train_text_encoder": ((False,), "stop", "minicat trains the transformer's adapter only"),
    "noise_offset": ((0,), "stop", "minicat's noise has no offset (the official recipe)"),
    "input_perturbation": ((0,), "stop", "minicat's noise is not perturbed"),
    "flow_use_beta_schedule": ((False,), "stop", "minicat samples sigmoid(N(0, 1)) or uniform"),
    "flow_sigmoid_scale": ((1,), "stop", "minicat samples sigmoid(N(0, 1)), scale 1"),
    "minimum_image_size": (
        (0,),
        "warn",
        "minicat trains every image; smaller ones are resized up into their bucket",
    ),
    "push_to_hub": ((False,), "warn", NO_UPLOAD),
    "push_checkpoints_to_hub": ((False,), "warn", NO_UPLOAD),
    "hub_model_id": (None, "warn", NO_UPLOAD),
    "model_card_note": (None, "warn", NO_UPLOAD),
    "report_to": (("none",), "warn", NO_TRACKER),
    "tracker_project_name": (None, "warn", NO_TRACKER),
    "tracker_run_name": (None, "warn", NO_TRACKER),
    "logging_dir": (None, "warn", NO_TRACKER),
    "vae_batch_size": (None, "warn", "the caching pass encodes one image at a time (same latents)"),
    "quantize_via": (None, "warn", "minicat quantizes each layer as it loads, on the device"),
    "num_eval_images": (None, "warn", "minicat runs no evaluation set, validation images only"),
    "validation_disable_unconditional": (
        (True,),
        "warn",
        "minicat makes no unconditional validation image",
    ),
    "validation_guidance_rescale": ((0,), "warn", "minicat's validation has no guidance rescale"),
    "validation_prompt_library": ((False,), "warn", "validation uses validation_prompt only"),
    "validation_torch_compile": ((False,), "warn", "validation runs uncompiled"),
    "disable_benchmark": ((False,), "warn", "minicat always draws the step-0 validation grid"),
    "disable_bucket_pruning": ((True,), "warn", "minicat prunes no bucket: every image trains"),
    "aspect_bucket_rounding": (None, "warn", "buckets are on the aspect_bucket_alignment grid"),
    "gradient_checkpointing_interval": (
        None,
        "warn",
        "memory only: minicat checkpoints each block",
    ),
    "enable_group_offload": ((False,), "warn", "memory only: minicat's is offload_blocks = N"),
    "lora_format": (("diffusers",), "warn", "minicat's LoRA file loads in diffusers and ComfyUI"),
    "webhook_config": (None, "warn", NO_TRACKER),
    "allow_tf32": (None, "warn", "minicat trains bf16 on GPUs; TF32 matmuls are torch's default"),
    "disable_tf32": (None, "warn", "minicat trains bf16 on GPUs; TF32 matmuls are torch's default"),
    "delete_problematic_images": ((False,), "warn", "minicat never changes the dataset folders"),
    "delete_unwanted_images": ((False,), "warn", "minicat never changes the dataset folders"),
    "compress_disk_cache": (None, "warn", "minicat's caches are uncompressed safetensors"),
    "loss_type": (("l2", "mse"), "stop", "minicat's loss is the MSE (the official recipe)"),
    "pretrained_vae_model_name_or_path": (None, "stop", "minicat uses the checkpoint's VAE"),
    "tread_config": (None, "stop", "minicat routes every token through every block"),
    "distillation_method": (None, "stop", "minicat trains with the flow-matching loss only"),
    "distillation_config": (None, "stop", "minicat trains with the flow-matching loss only"),
    "controlnet": ((False,), "stop", "minicat trains a LoRA or LoKr, no ControlNet"),
    "vae_enable_tiling": (None, "warn", MEMORY),
    "vae_enable_slicing": (None, "warn", MEMORY),
    "vae_enable_patch_conv": (None, "warn", MEMORY),
    "musubi_blocks_to_swap": (None, "warn", f"{MEMORY}; minicat's is offload_blocks = N"),
    "ramtorch": ((False,), "warn", f"{MEMORY}; minicat's is offload_blocks = N"),
    "offload_during_startup": (None, "warn", MEMORY),
    "gradient_checkpointing_backend": (("torch",), "warn", MEMORY),
    "gradient_checkpointing_segment_stride": (None, "warn", MEMORY),
    "fuse_qkv_projections": ((False,), "warn", "speed only; minicat keeps q, k, v apart"),
    "dynamo_backend": (("no",), "warn", "speed only; compile = true compiles each block"),
    "dynamo_mode": (None, "warn", "speed only; compile = true compiles each block"),
    "dynamo_use_regional_compilation": (None, "warn", "speed only; see compile"),
    "num_processes": ((1,), "warn", "run torchrun --nproc_per_node=N train.py ..."),
    "context_parallel_size": ((1,), "warn", "minicat runs data parallel only (torchrun)"),
    "text_encoder_batch_size": (None, "warn", "the caching pass encodes one text at a time"),
    "text_cache_disable": ((False,), "warn", "minicat caches every text embedding first"),
    "text_cache_ondemand": ((False,), "warn", "minicat caches every text embedding first"),
    "vae_cache_ondemand": ((False,), "warn", "minicat caches every latent first"),
    "skip_file_discovery": (None, "warn", "minicat checks every file before training"),
    "allow_dataset_oversubscription": (None, "warn", "minicat does not pad repeats"),
    "strict_epoch_limit": (None, "warn", "minicat stops at max_train_steps or num_train_epochs"),
    "eval_steps_interval": (None, "warn", "minicat runs no evaluation set, validation images only"),
    "validation_lycoris_strength": ((1,), "warn", "validation applies the adapter at 1.0"),
    "validation_guidance_real": ((1,), "warn", "minicat's validation has no real-CFG pass"),
    "user_prompt_library": (None, "warn", "validation uses validation_prompt only"),
    "trust_remote_code": (None, "warn", "minicat runs no code from the hub"),
    "checkpoint_epoch_interval": (None, "warn", "minicat checkpoints every checkpointing_steps"),
    "validation_epoch_interval": (None, "warn", "minicat validates every validation_steps"),
    "lora_init_type": (("default",), "stop", "minicat initialises as peft: B = 0, A uniform"),
    "use_dora": ((False,), "stop", "minicat trains plain LoRA or LoKr, not DoRA"),
    "snr_gamma": ((0,), "stop", "minicat weights every timestep alike (the official recipe)"),
    "pretrained_transformer_model_name_or_path": (None, "stop", "minicat loads one checkpoint"),
    "num_validation_images": ((1,), "warn", "minicat draws one image per validation prompt"),
    "validation_noise_scheduler": (None, "warn", "validation samples as the diffusers pipeline"),
    "base_model_default_dtype": (None, "warn", "minicat picks bf16 on GPUs, fp32 on the CPU"),
    "vae_dtype": (None, "warn", "minicat picks bf16 on GPUs, fp32 on the CPU"),
    "dataloader_prefetch": (None, "warn", "speed only"),
    "max_workers": (None, "warn", "speed only"),
    "read_batch_size": (None, "warn", "speed only"),
    "write_batch_size": (None, "warn", "speed only"),
    "image_processing_batch_size": (None, "warn", "speed only"),
    "torch_num_threads": (None, "warn", "speed only"),
    "metadata_update_interval": (None, "warn", "minicat keeps no metadata cache"),
    "repeats": (None, "warn", "a dataset's key (SimpleTuner ignores it here too): set it there"),
    "peft_lora_mode": (("standard",), "stop", "minicat trains standard LoRA (no SingLoRA)"),
    "init_lora": (None, "stop", "minicat starts every adapter from B = 0"),
}
# Top-level keys naming files and folders: a placeholder SimpleTuner leaves as it is is refused.
PATH_KEYS = ("output_dir", "data_backend_config", "lycoris_config", "resume_from_checkpoint")
# Keys minicat reads itself (not Config fields): config.py handles them.
READ_HERE = (
    "data_backend_config",
    "attention_mechanism",
    "resolution",
    "resolution_type",
    "ema_validation",
)
# SimpleTuner's ema_validation -> what validation shows (validation_show)
EMA_VALIDATION = {"none": ["trained"], "ema_only": ["ema"], "comparison": ["trained", "ema"]}

# A dataset's keys minicat has no key for, as KEYS.
DATASET_KEYS = {
    "type": (("local",), "stop", "minicat reads local folders; download the dataset into one"),
    "dataset_name": (None, "stop", "a Hugging Face dataset: minicat reads local folders"),
    "metadata_backend": (None, "warn", "minicat reads the image sizes itself"),
    "crop": (None, "warn", "minicat fits every image into its bucket: cover resize, centre crop"),
    "crop_style": (("center", "centre"), "warn", "minicat crops at the centre"),
    "crop_aspect": (None, "warn", "minicat's buckets keep each image's aspect (0.5-2)"),
    "minimum_image_size": (None, "warn", KEYS["minimum_image_size"][2]),
    "maximum_image_size": (None, "warn", "minicat resizes straight into the bucket (Lanczos)"),
    "target_downsample_size": (None, "warn", "minicat resizes straight into the bucket (Lanczos)"),
    "prepend_instance_prompt": ((False,), "stop", "captions are used as written"),
    "only_instance_prompt": ((False,), "stop", 'use caption_strategy = "instanceprompt"'),
    "vae_cache_clear_each_epoch": (
        (False,),
        "warn",
        "minicat encodes each image once (no augmentation between epochs)",
    ),
    "probability": ((1,), "stop", ONE_ORDER),
    "ignore_epochs": ((False,), "warn", ONE_ORDER),
    "skip_file_discovery": (None, "warn", "minicat checks every file before training"),
    "preserve_data_backend_cache": (None, "warn", "minicat's caches are keyed by content"),
    "hash_filenames": (None, "warn", "minicat's cache entries are named by content"),
    "conditioning": (
        None,
        "stop",
        "SimpleTuner makes conditioning images (canny, ...); minicat pairs an edit set with a "
        "reference folder named in conditioning_data",
    ),
    "is_regularisation_data": ((False,), "stop", "minicat has no regularisation data"),
    "caption_column": (None, "stop", "a Hugging Face dataset's column: minicat reads folders"),
    "image_column": (None, "stop", "a Hugging Face dataset's column: minicat reads folders"),
    "video": (None, "stop", "minicat trains images"),
    "audio": (None, "stop", "minicat trains images"),
    "caption_filter_list": (None, "stop", "captions are used as written"),
    "image_embeds": (None, "warn", "latents are cached in the dataset's cache_dir_vae"),
    "text_embeds": (None, "used", ""),  # the text_embeds entry named: its cache_dir
    "default": (None, "used", ""),  # on text_embeds entries
    "cache_dir": (None, "used", ""),  # on text_embeds and image_embeds entries
}
DATASET_TYPES = ("image", "conditioning", "text_embeds", "image_embeds")
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
# A // comment outside a string (the quickstarts' snippets are jsonc); strings are kept as they are.
COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*')


def plain(value):
    """A value as SimpleTuner reads it: 'true' / 'false' as booleans, numbers written as strings as
    numbers (int when whole), anything else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return value


def read_file(path: Path) -> dict:
    """A config file as a mapping: JSON when it is one (SimpleTuner's config.json), else TOML."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if path.suffix.lower() in (".json", ".jsonc") or text.lstrip().startswith("{"):
        try:
            raw = json.loads(COMMENT.sub(lambda m: m.group(1) or "", text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config.json holds one object of keys")
        return raw
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None


def _fate(table: dict, key: str, value) -> tuple[str, str]:
    """('same' | 'warn' | 'stop' | 'used', why) of a key minicat has no field for."""
    same, kind, why = table[key]
    if kind == "used":
        return "used", ""
    if same is not None and plain(value) in same:
        return "same", ""
    if key == "optimizer" and value in ADAMW:
        return "warn", f"minicat's AdamW keeps float32 states, not {value}'s"
    return kind, why


def expand(value, variables: dict | None, where: str, problems: list[str]):
    """Placeholders expanded in every string of value (nested lists and dicts too); an unknown one
    is a problem naming it. variables None: {env:NAME} only, other braces kept (a prompt's)."""
    if isinstance(value, list):
        return [expand(v, variables, where, problems) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, variables, f"{where}.{k}", problems) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("env:"):
            if name[4:] not in os.environ:  # SimpleTuner puts "" (a path could turn absolute)
                problems.append(
                    f"{where} = {value!r}: the environment variable {name[4:]} is not set: set "
                    "it, or write the value"
                )
            return os.environ.get(name[4:], "")
        if variables is None:
            return match.group(0)
        if name in variables:
            return str(variables[name])
        known = ", ".join("{" + k + "}" for k in [*variables, "env:NAME"])
        problems.append(f"{where} = {value!r}: unknown placeholder {{{name}}} (known: {known})")
        return match.group(0)

    return PLACEHOLDER.sub(one, value)


def json_list(text: str, path: Path, key: str, problems: list[str]) -> list | str:
    """peft_lora_target_modules as SimpleTuner takes it: a JSON list, or a JSON file holding one
    (relative to the config)."""
    file = path.parent / text
    try:
        found = json.loads(file.read_text("utf-8") if file.is_file() else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        found = None
    if not isinstance(found, list):
        problems.append(f"{path}: {key} = {text!r}: a list of module names (JSON, or its file)")
        return text
    return found


def find_backend_file(name: str, config_path: Path) -> Path:
    """data_backend_config's file: beside the config first, then from the working folder (where
    SimpleTuner runs), then `config/examples/X` as an example of SimpleTuner's package."""
    for candidate in (config_path.parent / name, Path(name), config_path.parent / Path(name).name):
        if candidate.expanduser().is_file():
            return candidate.expanduser()
    raise ValueError(
        f"{config_path}: data_backend_config = {name!r}: no such file beside the config or in "
        f"{Path.cwd()}"
    )


def translate(raw: dict, path: Path, fields: set[str]) -> tuple[dict, list[str], list[str]]:
    """(minicat's keys and values, warnings, problems) of a config mapping in SimpleTuner's or
    minicat's spelling. Keys that are minicat's own pass through (config.py checks their types);
    `fields` are their names."""
    values, warnings, problems = {}, [], []
    seen: dict[str, str] = {}  # minicat's name -> the spelling the file used
    for key, value in raw.items():
        name = key.lstrip("-") if isinstance(key, str) else key
        if value is None:  # null: unset, as SimpleTuner reads it
            continue
        # SimpleTuner expands {env:NAME} here; in a path any other {name} would become a folder
        value = expand(value, {} if name in PATH_KEYS else None, name, problems)
        name = RENAMED.get(name, name)
        if name in seen:
            if plain(values.get(name, value)) != plain(value):
                problems.append(
                    f"{path}: {seen[name]} and {key} are one key, set to two values; keep one"
                )
            continue
        seen[name] = key
        if name in fields or name in READ_HERE:
            values[name] = value
        elif name in KEYS:
            kind, why = _fate(KEYS, name, value)
            if kind == "warn":
                warnings.append(f"{path}: {key} = {value!r} is ignored: {why}")
            elif kind == "stop":
                problems.append(f"{path}: {key} = {value!r} is not supported: {why}")
        else:
            values[name] = value  # config.py names it unknown, with the closest key
    if isinstance(values.get("lora_targets"), str):  # peft_lora_target_modules' text or file
        found = json_list(values.pop("lora_targets"), path, seen["lora_targets"], problems)
        if isinstance(found, list):  # else reported once, not again as a wrong type
            values["lora_targets"] = found
    if "base_model_precision" in values:
        values["base_model_precision"] = PRECISIONS.get(
            values["base_model_precision"], values["base_model_precision"]
        )
    if (mechanism := values.pop("attention_mechanism", None)) is not None:
        if mechanism in ATTENTION and "attention_backend" not in values:
            values["attention_backend"] = ATTENTION[mechanism]
        elif mechanism in ATTENTION:
            warnings.append(
                f"{path}: attention_mechanism = {mechanism!r} is not used: attention_backend = "
                f"{values['attention_backend']!r} is set too and wins"
            )
        else:
            warnings.append(
                f"{path}: attention_mechanism = {mechanism!r} is ignored: minicat has torch's "
                "kernels only (attention_backend = auto picks one; the same result to rounding)"
            )
    if isinstance(values.get("lr_scheduler"), str) and values["lr_scheduler"] == (
        "cosine_with_warmup"
    ):
        values["lr_scheduler"] = "cosine"  # SimpleTuner's alias (normalize_lr_scheduler_value)
    if "ema_validation" in values:
        view = values.pop("ema_validation")
        if view not in EMA_VALIDATION:
            problems.append(
                f"{path}: ema_validation = {view!r}: one of {', '.join(EMA_VALIDATION)}"
            )
        elif "validation_show" not in values:
            values["validation_show"] = EMA_VALIDATION[view]
    backend = values.pop("data_backend_config", None)
    defaults = {k: values.pop(k) for k in ("resolution", "resolution_type") if k in values}
    if "resolution" in defaults:  # checked here, so a bad one is named as the config's own key
        side = plain(defaults["resolution"])
        if isinstance(side, bool) or not isinstance(side, int) or not 64 <= side <= 16384:
            problems.append(
                f"{path}: resolution = {defaults['resolution']!r}: the datasets' bucket side in "
                "pixels, a whole number in [64, 16384] (1024 for LongCat)"
            )
            del defaults["resolution"]
    if backend is not None:
        if "datasets" in values:
            problems.append(f"{path}: data_backend_config and [[datasets]] both name datasets")
        else:
            try:
                found = find_backend_file(str(backend), path)
                values["datasets"] = read_backends(found)
            except ValueError as e:  # reported with the other keys' problems
                problems.append(str(e))
                found = path
            path_of_sets = found
    else:
        path_of_sets = path
    if isinstance(values.get("datasets"), list):
        variables = {
            "model_family": raw.get("model_family", raw.get("--model_family", "longcat_image")),
            "output_dir": values.get("output_dir", "output"),
        }
        sets, w, p = translate_datasets(values["datasets"], path_of_sets, variables, defaults)
        values["datasets"] = sets
        warnings += w
        problems += p
    return values, warnings, problems


def read_backends(path: Path) -> list:
    """A multidatabackend.json: a list of dataset entries."""
    try:
        entries = json.loads(COMMENT.sub(lambda m: m.group(1) or "", path.read_text("utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a multidatabackend file holds a list of datasets")
    return entries


def translate_datasets(
    entries: list, path: Path, variables: dict, defaults: dict
) -> tuple[list, list[str], list[str]]:
    """(minicat's [[datasets]] entries, warnings, problems): placeholders expanded, text_embeds
    entries turned into each dataset's cache_dir_text, image_embeds entries reported, SimpleTuner's
    keys minicat lacks ignored or refused. Keys neither side knows stay for data.py to name."""
    warnings, problems, images, embeds = [], [], [], {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            images.append(entry)  # data.py names it
            continue
        ident = entry.get("id") if isinstance(entry.get("id"), str) else f"datasets[{n}]"
        where = f"{path}: dataset '{ident}'"
        entry = {k.lstrip("-"): v for k, v in entry.items() if v is not None}
        entry = expand(entry, variables | {"id": ident}, where, problems)
        kind = entry.get("dataset_type", "image")
        if kind not in DATASET_TYPES:
            problems.append(
                f"{where}: dataset_type = {kind!r} is not supported (minicat trains images: "
                f"{', '.join(DATASET_TYPES)})"
            )
            continue
        if kind in ("text_embeds", "image_embeds"):
            if entry.get("type", "local") != "local":
                problems.append(
                    f"{where}: type = {entry['type']!r} is not supported: minicat caches on "
                    "local disk (this entry's keys are S3 settings)"
                )
            elif kind == "text_embeds":
                embeds[ident] = entry
            else:
                warnings.append(
                    f"{where}: an image_embeds entry is ignored: minicat caches latents in each "
                    "dataset's cache_dir_vae"
                )
            continue
        if entry.get("conditioning_type", "reference_strict") not in ("reference_strict", "mask"):
            problems.append(
                f"{where}: conditioning_type = {entry['conditioning_type']!r} is not supported: "
                "minicat fits each reference into its target's bucket (reference_strict, as the "
                "official recipe) or reads a loss mask (mask)"
            )
        if s3 := [k for k in entry if k.startswith("aws_")]:
            problems.append(f"{where}: {', '.join(s3)} are not supported: S3 storage")
            entry = {k: v for k, v in entry.items() if k not in s3}
        for key in [k for k in entry if k in DATASET_KEYS]:
            fate, why = _fate(DATASET_KEYS, key, entry[key])
            if fate == "warn":
                warnings.append(f"{where}: {key} = {entry[key]!r} is ignored: {why}")
            elif fate == "stop":
                problems.append(f"{where}: {key} = {entry[key]!r} is not supported: {why}")
            if fate != "used" or key != "text_embeds":
                entry.pop(key)
        if entry.get("conditioning_type") == "reference_strict":
            entry.pop("conditioning_type")  # what data.py does with every reference set

        for key in ("resolution", "repeats", "disabled"):  # "1024" as SimpleTuner reads it
            if key in entry:
                entry[key] = plain(entry[key])
        if entry.get("dataset_type") == "conditioning":
            entry.pop("dataset_type")  # a reference set: data.py knows it by conditioning_data
        for key, value in defaults.items():  # the top-level resolution is the datasets' default
            entry.setdefault(key, plain(value))
        if entry.get("resolution_type", "pixel_area") != "pixel_area":
            problems.append(
                f"{where}: resolution_type = {entry['resolution_type']!r} is not supported: "
                "minicat's resolution is the side of the bucket's area (pixel_area)"
            )
        images.append(entry)
    default = [e for e in embeds.values() if plain(e.get("default")) is True] or list(
        embeds.values()
    )[:1]
    for entry in images:
        if not isinstance(entry, dict):
            continue
        named = entry.pop("text_embeds", None)
        source = embeds.get(named) if named is not None else (default[0] if default else None)
        if named is not None and source is None:
            problems.append(
                f"{path}: dataset '{entry.get('id')}': text_embeds = {named!r}: no text_embeds "
                f"entry with that id ({', '.join(embeds) or 'none'})"
            )
        elif source is not None and source.get("cache_dir") and "cache_dir_text" not in entry:
            entry["cache_dir_text"] = source["cache_dir"]
    return images, warnings, problems
