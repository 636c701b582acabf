"""SimpleTuner's own files (tests/data/simpletuner: copied from bghira/SimpleTuner bc8e6ab, only
their paths changed) read by train.py: every key used, ignored with a warning or refused, together.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, train_cli
from PIL import Image

import config
import data
import lora
import simpletuner
import train

DATA = Path(__file__).parent / "data" / "simpletuner"


def load(path: Path, *overrides: str) -> config.Config:
    return config.load_config(path, ["--pretrained_model_name_or_path=tiny", *overrides])


def test_edit_example_reports_every_key_at_once(capsys):
    """SimpleTuner's LongCat-Edit LoKr example: each of its 39 keys has the fate written here by
    hand. Catches a key dropped silently, a stop reported one per run, or a warning lost."""
    used = (
        "base_model_precision checkpoint_step_interval data_backend_config flow_schedule_shift "
        "gradient_checkpointing learning_rate lora_alpha lora_rank lora_type lr_scheduler "
        "lycoris_config max_train_steps model_flavour num_train_epochs output_dir seed "
        "train_batch_size validation_guidance validation_num_inference_steps "
        "validation_resolution validation_seed validation_steps tracker_project_name "
        "tracker_run_name"
    ).split()
    same = "model_family model_type push_checkpoints_to_hub push_to_hub report_to use_ema"
    same += " validation_disable_unconditional validation_guidance_rescale disable_bucket_pruning"
    warn = ("hub_model_id num_eval_images optimizer quantize_via vae_batch_size").split()
    stop = ["grad_clip_method"]
    path = DATA / "longcat-edit-lokr" / "config.json"
    keys = json.loads(path.read_text())
    assert sorted(keys) == sorted([*used, *same.split(), *warn, *stop]), "the table misses a key"
    with pytest.raises(ValueError) as e:
        load(path)
    err, out = str(e.value).splitlines(), capsys.readouterr().err
    for key in warn:
        assert f"config.json: {key} = " in out, key
    for key in [*used, *same.split()]:
        assert f": {key} = " not in out + "\n".join(err), key
    for key in ("lora_rank", "lora_alpha"):  # LoKr's sizes come from lycoris_config
        assert f"{key} is not used with lora_type = lycoris" in out, key
    assert any("grad_clip_method = 'value'" in line for line in err)
    # the dataset: a Hugging Face dataset with generated (canny) conditioning, one line each
    for needle in ("type = 'huggingface'", "dataset_name", "conditioning = "):
        assert sum(needle in line for line in err) == 1, (needle, err)
    assert len(err) == 4, err


def test_prefixes_strings_null_and_renamed_keys(tmp_path):
    """config.json.example's spellings. Catches a -- prefix kept, a number or boolean left a
    string, null read as a value, or SimpleTuner's current names refused."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "--checkpoint_step_interval": "50",
                "--validation_step_interval": 25,
                "--gradient_checkpointing": "false",
                "--learning_rate": "1e-4",
                "--seed": None,
                "--lr_scheduler": "polynomial",
                "--save_total_limit": 2,
                "--datasets": [],
            }
        )
    )
    cfg = load(path, "--validation_steps=0")
    assert cfg.checkpointing_steps == 50
    assert cfg.validation_steps == 0  # the override replaces either spelling
    assert cfg.gradient_checkpointing is False
    assert cfg.learning_rate == 1e-4
    assert cfg.seed == 0
    assert cfg.checkpoints_total_limit == 2


def test_two_spellings_two_values_are_refused(tmp_path):
    """Catches the second spelling silently winning."""
    path = tmp_path / "config.json"
    path.write_text('{"checkpointing_steps": 10, "checkpoint_step_interval": 20}')
    with pytest.raises(ValueError, match="checkpointing_steps and checkpoint_step_interval"):
        load(path)


def test_placeholders_and_text_embeds(tmp_path):
    """The dreambooth example's dataset: {model_family} expanded, the text_embeds entry's
    cache_dir becomes cache_dir_text; an unknown placeholder is named. Catches a folder literally
    called {model_family}, or the text cache dir dropped."""
    sets = json.loads(
        (DATA / "longcat-image-lora" / "multidatabackend-small-dreambooth-512px.json").read_text()
    )
    variables = {"model_family": "longcat_image", "output_dir": "out"}
    entries, _, problems = simpletuner.translate_datasets(sets, tmp_path, variables, {})
    assert len(entries) == 1
    assert entries[0]["cache_dir_vae"] == "cache/vae/longcat_image/dreambooth-512"
    assert entries[0]["cache_dir_text"] == "cache/text/longcat_image"
    sets[0]["cache_dir_vae"] = "cache/{model}/x"
    _, _, problems = simpletuner.translate_datasets(sets, tmp_path, variables, {})
    assert any("unknown placeholder {model}" in p for p in problems), problems


def test_a_static_shift_the_user_set_is_used(tmp_path, capsys):
    """Catches flow_schedule_shift = 3 silently losing to the default auto shift."""
    path = tmp_path / "config.json"
    path.write_text('{"flow_schedule_shift": 3, "datasets": []}')
    cfg = load(path)
    assert (cfg.flow_schedule_shift, cfg.flow_schedule_auto_shift) == (3.0, False)
    path.write_text('{"flow_schedule_shift": 3, "flow_schedule_auto_shift": true, "datasets": []}')
    assert load(path).flow_schedule_auto_shift is True
    assert "flow_schedule_auto_shift = true wins" in capsys.readouterr().err


def test_unset_model_path_follows_the_flavour(tmp_path):
    """Catches model_flavour = final resolving the Edit checkpoint."""
    path = tmp_path / "config.json"
    path.write_text('{"model_flavour": "final", "datasets": []}')
    cfg = config.load_config(path, [])
    assert cfg.pretrained_model_name_or_path == "meituan-longcat/LongCat-Image"


def test_polynomial_schedule_is_diffusers():
    """lr 1e-4 -> lr_end 4e-7 with power 0.8, no warmup, 100 steps: at step 50 diffusers'
    get_polynomial_decay_schedule_with_warmup gives ((1e-4 - 4e-7) * 0.5**0.8 + 4e-7) / 1e-4 =
    0.57605... Catches a missing lr_end or power."""
    cfg = config.Config(lr_scheduler="polynomial", learning_rate=1e-4, max_train_steps=100)
    assert math.isclose(train.lr_factor(50, cfg), (9.96e-5 * 0.574349177498517 + 4e-7) / 1e-4)
    assert math.isclose(train.lr_factor(100, cfg), 4e-7 / 1e-4)
    cfg = config.Config(lr_scheduler="cosine_with_warmup", lr_warmup_steps=10, max_train_steps=110)
    assert train.lr_factor(60, cfg) == pytest.approx(0.5)  # half way through the cosine


def test_attention_preset_is_simpletuners():
    """Catches the preset naming the official 12 targets."""
    cfg = config.Config(lora_target_preset="attention")
    cfg.check()
    assert cfg.lora_targets == ["to_k", "to_q", "to_v", "to_out.0"]
    cfg = config.Config()
    cfg.check()
    assert cfg.lora_targets == list(lora.DEFAULT_TARGETS)


def test_lycoris_trains_lokr_and_is_its_own_run(tiny_edit, tmp_path):
    """lora_type = lycoris with the example's lycoris_config puts LoKr layers in; the run identity
    differs from a LoRA's. Catches lycoris_config read but a LoRA trained, or a LoRA checkpoint
    resumed as LoKr."""
    lycoris = str(DATA / "longcat-edit-lokr" / "lycoris_config.json")
    cfg = config.Config(lora_type="lycoris", lycoris_config=lycoris, base_model_precision="none")
    cfg.check()
    transformer, params = train.build_transformer(cfg, tiny_edit, config.pick_device("cpu"))
    assert lora._lokr_layers(transformer) and not lora._lora_layers(transformer)
    plain = config.Config()
    plain.check()
    assert train.run_identity(cfg, tiny_edit, 1) != train.run_identity(plain, tiny_edit, 1)


def test_quickstart_edit_trains_on_the_tiny_model(tmp_path):
    """The LongCat-Edit quickstart's config and dataloader, as written (jsonc comment included),
    paths pointed at the bundled pairs: two steps on the tiny model. Catches the quickstart
    refused."""
    for f in (DATA / "quickstart-edit").iterdir():
        shutil.copy(f, tmp_path / f.name)
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(backend.read_text().replace("../../../../examples", str(ROOT / "examples")))
    proc = train_cli(
        tmp_path / "config.json",
        pretrained_model_name_or_path="tiny",
        max_train_steps=2,
        validation_steps=0,
    )
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists(), proc.stdout


def test_simpletuners_own_files_name_no_unknown_key(capsys):
    """Every key of SimpleTuner's LongCat examples and config.json.example gets a reason, not
    'unknown key'. Catches a SimpleTuner key left out of simpletuner.KEYS or DATASET_KEYS."""
    for name in ("longcat-edit-lokr", "longcat-image-lora", "example"):
        with pytest.raises(ValueError) as e:
            load(DATA / name / "config.json")
        report = str(e.value) + capsys.readouterr().err
        assert "unknown" not in report.replace("unknown placeholder", ""), report


def test_the_t2i_example_stops_for_its_dataset_only(capsys):
    """LongCat-Image's LoRA example: its only stops are its dataset's (Hugging Face, resolution
    'pixel'); attention_mechanism native-flash is mapped, not reported. Catches a used key
    refused."""
    with pytest.raises(ValueError) as e:
        load(DATA / "longcat-image-lora" / "config.json")
    err = str(e.value).splitlines()
    assert all("dataset 'dreambooth-512'" in line for line in err), err
    assert len(err) == 3, err
    assert "attention_mechanism" not in capsys.readouterr().err


def test_the_lokr_example_trains_validates_and_is_never_resumed_as_a_lora(tmp_path):
    """The LoKr example's lycoris_config (every Linear, x_embedder included) on the tiny model:
    a step, a validation grid, then the same output_dir as a plain LoRA is refused naming
    lora_type. Catches the run identity missing the adapter type, or the model's dtype read off a
    wrapped x_embedder (which has no weight of its own)."""
    for f in (DATA / "quickstart-edit").iterdir():
        shutil.copy(f, tmp_path / f.name)
    backend = tmp_path / "multidatabackend.json"
    text = backend.read_text().replace("../../../../examples", str(ROOT / "examples"))
    backend.write_text(text.replace('"resolution": 768', '"resolution": 128'))
    lycoris = DATA / "longcat-edit-lokr" / "lycoris_config.json"
    keys = dict(pretrained_model_name_or_path="tiny", max_train_steps=1, validation_steps=1)
    keys |= dict(validation_num_inference_steps=2, validation_resolution="64x64")
    train_cli(tmp_path / "config.json", lora_type="lycoris", lycoris_config=lycoris, **keys)
    assert list((tmp_path / "output" / "validation").iterdir())
    proc = train_cli(tmp_path / "config.json", check=False, **keys)
    assert proc.returncode != 0 and "lora_type: 'lycoris' there, 'standard' now" in proc.stderr


def test_braces_in_a_prompt_stay_and_in_a_path_are_named(tmp_path, monkeypatch):
    """{env:NAME} is expanded everywhere; other braces stay in a prompt (SimpleTuner keeps them)
    but stop the run in output_dir (a folder literally named so). Catches either rule reversed."""
    monkeypatch.setenv("MINICAT_TEST_OUT", str(tmp_path / "o"))
    path = tmp_path / "config.json"
    keys = {"validation_prompt": "a {cat}", "output_dir": "{env:MINICAT_TEST_OUT}", "datasets": []}
    path.write_text(json.dumps(keys))
    cfg = load(path)
    assert (cfg.validation_prompt, cfg.output_dir) == (["a {cat}"], str(tmp_path / "o"))
    path.write_text(json.dumps(keys | {"output_dir": "out/{model_family}"}))
    with pytest.raises(
        ValueError, match=r"output_dir = 'out/\{model_family\}': unknown placeholder"
    ):
        load(path)
    # an unset variable is named (SimpleTuner's "" would make "{env:X}/out" the absolute /out)
    monkeypatch.delenv("MINICAT_TEST_OUT")
    path.write_text(json.dumps(keys | {"output_dir": "{env:MINICAT_TEST_OUT}/out"}))
    with pytest.raises(ValueError, match="environment variable MINICAT_TEST_OUT is not set"):
        load(path)


def test_a_toml_with_simpletuners_keys_reads_its_backend_file(tmp_path):
    """The same keys in TOML: data_backend_config is read beside it. Catches JSON-only reading."""
    shutil.copy(
        DATA / "longcat-image-lora" / "multidatabackend-small-dreambooth-512px.json", tmp_path
    )
    path = tmp_path / "config.toml"
    path.write_text('data_backend_config = "multidatabackend-small-dreambooth-512px.json"\n')
    with pytest.raises(ValueError, match="dataset 'dreambooth-512': type = 'huggingface'"):
        load(path)


def test_a_typo_of_a_simpletuner_key_finds_it(tmp_path):
    """Catches the suggestion looking at minicat's own keys only."""
    path = tmp_path / "config.json"
    path.write_text('{"checkpoint_step_intervall": 5, "datasets": []}')
    with pytest.raises(ValueError, match="did you mean 'checkpoint_step_interval'"):
        load(path)


def test_type_range_and_foreign_problems_come_in_one_report(tmp_path):
    """A wrong type, a value out of range and a refused SimpleTuner key: three lines of one error.
    Catches a report cut short at the first problem."""
    path = tmp_path / "config.json"
    keys = {"seed": "x", "learning_rate": 5, "grad_clip_method": "value", "datasets": []}
    path.write_text(json.dumps(keys))
    with pytest.raises(ValueError) as e:
        load(path)
    err = str(e.value).splitlines()
    assert len(err) == 3, err
    for needle in ("seed should be int", "learning_rate = 5.0", "grad_clip_method"):
        assert sum(needle in line for line in err) == 1, (needle, err)


def test_peft_lora_target_modules_are_the_targets(tmp_path):
    """SimpleTuner's override of the targets, as a JSON list written as text. Catches it dropped
    (the preset's 12 trained instead)."""
    path = tmp_path / "config.json"
    keys = {"peft_lora_target_modules": '["to_q", "to_k"]', "datasets": []}
    path.write_text(json.dumps(keys))
    assert load(path).lora_targets == ["to_q", "to_k"]


def test_a_mask_dataset_in_a_multidatabackend_file_is_the_loss_mask(tmp_path):
    """SimpleTuner's masked loss: a `conditioning_type = "mask"` set named in conditioning_data,
    read through config.json's data_backend_config, becomes the edit set's mask. Catches the
    mask set refused as an unsupported conditioning_type, or its conditioning_type dropped (the
    mask images then trained as references)."""
    from test_data import ALIGN
    from test_masks import mask_config

    white = Image.new("L", (64, 64), 255)
    sets = mask_config(tmp_path, {"a.png": white}, {"a.png": (64, 64)})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(sets))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
    cfg = load(path)
    roles = {d.id: d.role for d in data.parse_datasets(cfg.datasets, tmp_path, ALIGN)}
    assert roles == {"edits": "edit", "refs": "reference", "masks": "mask"}, roles
    sets[-1]["conditioning_type"] = "reference_loose"
    (tmp_path / "multidatabackend.json").write_text(json.dumps(sets))
    with pytest.raises(ValueError, match="dataset 'masks': conditioning_type = 'reference_loose'"):
        load(path)


def test_a_lycoris_config_without_lora_type_lycoris_is_said_unused(tmp_path, capsys):
    """Catches a LoRA trained while the user believes the LoKr file is in use."""
    shutil.copy(DATA / "longcat-edit-lokr" / "lycoris_config.json", tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lycoris_config": "lycoris_config.json", "datasets": []}))
    assert load(path).lora_type == "standard"
    assert "lycoris_config is not used: lora_type = 'standard'" in capsys.readouterr().err


def test_a_bad_top_level_resolution_is_the_configs_own_key(tmp_path):
    """SimpleTuner's top-level resolution is every dataset's default; a bad one is named once, as
    the config's key. Catches it reported once per dataset, as if each dataset had it wrong."""
    sets = [{"id": "a", "instance_data_dir": "a"}, {"id": "b", "instance_data_dir": "b"}]
    (tmp_path / "sets.json").write_text(json.dumps(sets))
    path = tmp_path / "config.json"
    for bad in ("big", -5, 1.5):
        path.write_text(json.dumps({"data_backend_config": "sets.json", "resolution": bad}))
        with pytest.raises(ValueError) as e:
            load(path)
        lines = [line for line in str(e.value).splitlines() if "resolution" in line]
        assert lines == [
            f"{path}: resolution = {bad!r}: the datasets' bucket side in pixels, a whole number "
            "in [64, 16384] (1024 for LongCat)"
        ], lines
    path.write_text(json.dumps({"data_backend_config": "sets.json", "resolution": "512"}))
    assert [d["resolution"] for d in load(path).datasets] == [512, 512]


def test_ema_validation_is_what_validation_shows(tmp_path, capsys):
    """SimpleTuner's ema_validation = "comparison" shows the trained and the EMA adapter side by
    side. Catches it dropped with a false "minicat keeps no EMA" warning."""
    path = tmp_path / "config.json"
    for view, shown in (("comparison", ["trained", "ema"]), ("ema_only", ["ema"])):
        path.write_text(json.dumps({"use_ema": "true", "ema_validation": view, "datasets": []}))
        assert load(path).validation_show == shown
    assert "keeps no EMA" not in capsys.readouterr().err
    path.write_text(json.dumps({"use_ema": True, "ema_validation": "both", "datasets": []}))
    with pytest.raises(ValueError, match="ema_validation = 'both': one of none, ema_only"):
        load(path)
