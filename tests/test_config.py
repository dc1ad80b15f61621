"""Config: presets resolve and validate, YAML round-trips, errors name the field at fault."""

from __future__ import annotations

import pytest
import yaml

from ldm_core.config import PRESETS, Config, ConfigError, from_dict, load_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(preset, tmp_path):
    cfg = load_config(preset=preset)
    path = tmp_path / "run.yaml"
    cfg.save(path)
    again = load_config(path, preset=preset)
    assert again == cfg
    assert from_dict(yaml.safe_load(path.read_text())) == cfg


def test_presets_differ_in_intent():
    tiny, g16, multi = (load_config(preset=p) for p in ("tiny-cpu", "gpu-16g", "multi-gpu"))
    assert tiny.train.device == "auto" and tiny.train.amp == "none"
    assert g16.train.gradient_checkpointing and g16.train.amp == "fp16"
    assert multi.train.ddp_backend == "nccl" and multi.train.compile and multi.train.sync_bn
    assert multi.train.ddp_timeout_s > tiny.train.ddp_timeout_s


def test_layers_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: gpu-16g\ntrain:\n  autoencoder:\n    steps: 7\n")
    cfg = load_config(path, overrides=["train.autoencoder.steps=9", "train.amp=bf16"])
    assert cfg.train.autoencoder.steps == 9
    assert cfg.train.amp == "bf16"
    assert cfg.data.shape == tuple(PRESETS["gpu-16g"]["data"]["shape"])  # from the file's preset
    assert load_config(path, preset="tiny-cpu").data.shape == Config().data.shape


def test_tuples_come_back_as_tuples():
    cfg = load_config(overrides=["data.shape=[64,64,64]"])
    assert cfg.data.shape == (64, 64, 64)
    assert cfg.latent_shape == (3, 16, 16, 16)


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("data.shpe=[48,64,48]", "data.shpe", "did you mean 'shape'"),
        ("train.autoencoder.stepz=3", "train.autoencoder.stepz", "did you mean 'steps'"),
        ("data.shape=[48,56,48]", "data.shape", "H=56 is not divisible by 16"),
        ("model.autoencoder.channels=[16,30,32]", "model.autoencoder.channels[1]", "not divisible"),
        (
            "model.unet.attention_levels=[false,true]",
            "model.unet.attention_levels",
            "one per level",
        ),
        ("train.amp=fp8", "train.amp", "not one of"),
        ("sampling.sampler=dim", "sampling.sampler", "did you mean 'ddim'"),
        ("sampling.sampler=rflow", "sampling.sampler", "cannot sample"),
        ("train.autoencoder.steps=ten", "train.autoencoder.steps", "expected an integer"),
        ("train.autoencoder.steps=0", "train.autoencoder.steps", "must be positive"),
        ("data.shape=[48,64]", "data.shape", "expected 3 values"),
        ("train.compile=maybe", "train.compile", "expected true or false"),
        ("data.demo_subjects=0", "data.demo_subjects", "at least 1"),
        ("train.autoencoder.initial_sigma=0", "train.autoencoder.initial_sigma", "must be > 0"),
        ("train.device=tpu", "train.device", "must be auto"),
        ("train.autoencoder.spectral_weight=-1", "train.autoencoder.spectral_weight", ">= 0"),
        ("train.diffusion.lr_decay=linear", "train.diffusion.lr_decay", "not one of"),
        ("sampling.initial_noise_scale=0", "sampling.initial_noise_scale", "in (0, 1]"),
        ("sampling.initial_noise_scale=1.5", "sampling.initial_noise_scale", "in (0, 1]"),
        ("sampling.truncate_at=-1", "sampling.truncate_at", "got -1"),
        ("sampling.truncate_at=1000", "sampling.truncate_at", "num_train_timesteps=1000"),
        ("train.diffusion.prior_components=-2", "train.diffusion.prior_components", ">= 0"),
        ("train.diffusion.truncate_at=-1", "train.diffusion.truncate_at", "got -1"),
        ("train.diffusion.truncate_at=1000", "train.diffusion.truncate_at", "below model"),
        (
            "train.autoencoder.lr_warmup_steps=-1",
            "train.autoencoder.lr_warmup_steps",
            "must be >= 0",
        ),
    ],
)
def test_bad_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert message.startswith(field), message
    assert words in message, message


def test_a_truncated_start_refuses_a_scaled_starting_noise():
    """A truncated run starts from the prior noised, not from noise alone: scaling only the
    noise part would put the start off the forward process, so the pair is refused."""
    with pytest.raises(ConfigError, match="^sampling.initial_noise_scale: must be 1 when"):
        load_config(overrides=["sampling.truncate_at=600", "sampling.initial_noise_scale=0.9"])
    assert load_config(overrides=["sampling.initial_noise_scale=0.9"]).sampling.truncate_at == 0


def test_a_unet_trained_on_part_of_the_schedule_is_sampled_only_there():
    """train.diffusion.truncate_at leaves the UNet untrained above it: a sampler that starts
    higher (or at pure noise) is refused, naming both fields."""
    trained = "train.diffusion.truncate_at=600"
    with pytest.raises(
        ConfigError,
        match=r"^sampling.truncate_at: the UNet is trained on timesteps 0..600 only "
        r"\(train.diffusion.truncate_at\).* got 0 \(the whole schedule\)",
    ):
        load_config(overrides=[trained])
    with pytest.raises(ConfigError, match=r"^sampling.truncate_at: .* at or below 600; got 601"):
        load_config(overrides=[trained, "sampling.truncate_at=601"])
    rflow = ["model.scheduler.objective=rflow", "sampling.sampler=rflow"]
    with pytest.raises(ConfigError, match=r"^train.diffusion.truncate_at: .* needs the ddpm"):
        load_config(overrides=[*rflow, "train.diffusion.snr_gamma=0", trained])
    for start in (450, 600):
        cfg = load_config(overrides=[trained, f"sampling.truncate_at={start}"])
        assert (cfg.train.diffusion.truncate_at, cfg.sampling.truncate_at) == (600, start)
    top = ["train.diffusion.truncate_at=999", "sampling.truncate_at=999"]
    assert load_config(overrides=top).train.diffusion.truncate_at == 999


def test_shape_error_suggests_a_size():
    with pytest.raises(ConfigError, match="try 64"):
        load_config(overrides=["data.shape=[48,60,48]"])


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_config(listy)


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="did you mean 'gpu-16g'"):
        load_config(preset="gpu-16")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["train.amp"])
    with pytest.raises(ConfigError, match="^train.amp: expected a string"):
        load_config(overrides=["train.amp.x=1"])


@pytest.mark.parametrize(
    "sampler, objective", [("ddim", "ddpm"), ("ddpm", "ddpm"), ("rflow", "rflow")]
)
def test_no_sampler_takes_more_steps_than_training_had(sampler, objective):
    # Sampling refuses more steps than num_train_timesteps for every sampler, so the
    # config says so before any work starts (it used to check only for ddim).
    with pytest.raises(ConfigError, match="^sampling.steps: 100 exceeds .*=40"):
        load_config(
            overrides=[
                f"model.scheduler.objective={objective}",
                f"sampling.sampler={sampler}",
                "train.diffusion.snr_gamma=0",
                "model.scheduler.num_train_timesteps=40",
            ]
        )


def test_gpu_presets_keep_their_own_settings_over_the_shared_base():
    g16, g32, multi = (load_config(preset=p) for p in ("gpu-16g", "gpu-32g", "multi-gpu"))
    assert all(c.train.device == "cuda" and c.model.unet.norm_num_groups == 32 for c in (g16, g32))
    assert (g16.model.unet.channels, g32.model.unet.channels) == ((128, 256, 256), (128, 256, 512))
    assert multi.model.unet.num_head_channels == 64 and g16.model.unet.num_head_channels == 32
    assert (multi.train.val_every, g16.train.val_every) == (1000, 500)
    assert PRESETS["gpu-16g"] is not PRESETS["gpu-32g"]
    assert PRESETS["gpu-16g"]["model"]["unet"] is not PRESETS["gpu-32g"]["model"]["unet"]


def test_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "runs" / "config.yaml"
    load_config(preset="gpu-16g").save(path)
    load_config().save(path)
    assert load_config(path, preset="tiny-cpu") == load_config()
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize(
    ("preset", "ae_batch_size"), [("gpu-16g", 1), ("gpu-32g", 2), ("multi-gpu", 2)]
)
def test_gpu_presets_keep_the_training_recipe_they_had_before_the_tiny_cpu_retune(
    preset, ae_batch_size
):
    # The dataclass defaults are tiny-cpu's, tuned for a few minutes of CPU training
    # (benchmarks/README.md, "Demo anatomy"); the GPU presets' schedules are tens of
    # thousands of steps and pin their own recipe.
    cfg = load_config(preset=preset)
    ae, dm = cfg.train.autoencoder, cfg.train.diffusion
    assert cfg.model.autoencoder.latent_channels == 3
    assert cfg.model.scheduler.prediction_type == "epsilon"
    assert (ae.lr, ae.lr_warmup_steps, ae.lr_decay) == (1e-4, 0, "constant")
    assert (ae.adv_weight, ae.gradient_weight, ae.kl_weight) == (0.01, 0.0, 1e-6)
    assert ae.adv_start_step < ae.steps
    assert (dm.lr, dm.lr_warmup_steps, dm.lr_decay, dm.ema_decay) == (1e-4, 0, "constant", 0.999)
    assert (cfg.sampling.sampler, cfg.sampling.steps, cfg.sampling.eta) == ("ddim", 50, 0.0)
    assert cfg.evaluation.steps == 50
    assert ae.batch_size == ae_batch_size and cfg.model.autoencoder.channels[0] >= 32


def test_exponent_notation_is_a_number_although_yaml_1_1_reads_it_as_a_string():
    """PyYAML reads ``3e-4`` (no dot) as a string; a float field takes it as the number."""
    cfg = load_config(overrides=["train.autoencoder.lr=3e-4", "evaluation.gate_max_mmd=1e9"])
    assert cfg.train.autoencoder.lr == 3e-4 and cfg.evaluation.gate_max_mmd == 1e9
    with pytest.raises(ConfigError, match="train.autoencoder.steps: expected an integer"):
        load_config(overrides=["train.autoencoder.steps=1e3"])


# --------------------------------------------------------------------------- predictor capacity


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        # The server admits max_concurrency + max_queue; Knative routes containerConcurrency.
        (["serving.max_queue=3"], "serving.max_queue", "set serving.max_queue to at least 7"),
        # queue-proxy counts every forwarded request: 1 scales out at the second one.
        (["serving.scale_target=1"], "serving.scale_target", "use 8"),
        (["serving.scale_target=50"], "serving.scale_target", "Knative caps it; use 8"),
        # KServe's webhook (validateScalingKPACompExtension) refuses both in Serverless mode.
        (["serving.scale_metric=cpu"], "serving.scale_metric", "[cpu] is not a supported metric"),
        (
            ["serving.update_strategy=Recreate"],
            "serving.update_strategy",
            "only supported for raw deployment mode",
        ),
        (["serving.scale_metric=rps"], "serving.scale_target", "at least 1 request/s"),
        (
            ["serving.deployment_mode=RawDeployment", "serving.scale_metric=concurrency"],
            "serving.scale_metric",
            "RawDeployment's HPA scales on cpu or memory",
        ),
        (
            ["serving.deployment_mode=RawDeployment", "serving.scale_target=1"],
            "serving.scale_target",
            "HPA target of 1 % cpu",
        ),
        (
            ["serving.deployment_mode=RawDeployment", "serving.scale_metric=memory"],
            "serving.scale_target",
            "HPA target of 0 % memory",
        ),
        (["serving.update_strategy=Recreat"], "serving.update_strategy", "did you mean"),
        (["serving.progress_deadline_s=0"], "serving.progress_deadline_s", "must be positive"),
        # Knative's webhook refuses a revision timeout over max-revision-timeout-seconds.
        (
            ["serving.request_timeout_s=571"],
            "serving.request_timeout_s",
            "max-revision-timeout-seconds",
        ),
        (
            ["serving.deployment_mode=RawDeployment", "serving.min_replicas=0"],
            "serving.min_replicas",
            "no scale to zero without Knative",
        ),
    ],
)
def test_capacity_settings_are_checked_against_each_other_and_the_clusters_rules(
    overrides, field, words
):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value).startswith(f"{field}:") and words in str(info.value), info.value


def test_capacity_defaults_batch_in_either_mode():
    """The defaults pass in both modes: a concurrency target of one replica's batch in
    Serverless mode, KServe's 80 % cpu in RawDeployment mode (the mode alone is enough)."""
    serverless = load_config().serving
    assert (serverless.autoscale_metric, serverless.autoscale_target) == ("concurrency", 8)
    assert serverless.autoscale_target == serverless.container_concurrency
    assert serverless.container_concurrency <= serverless.max_concurrency + serverless.max_queue
    raw = load_config(overrides=["serving.deployment_mode=RawDeployment"]).serving
    assert (raw.autoscale_metric, raw.autoscale_target) == ("cpu", 80)
    recreate = ["serving.deployment_mode=RawDeployment", "serving.update_strategy=Recreate"]
    assert load_config(overrides=recreate).serving.update_strategy == "Recreate"
    bigger = load_config(overrides=["serving.max_concurrency=2", "serving.max_queue=14"])
    assert bigger.serving.autoscale_target == 16
    # 570 s is the longest request Knative's default revision timeout (600 s) leaves room for;
    # an HPA-scaled Deployment has no such limit.
    assert load_config(overrides=["serving.request_timeout_s=570"]).serving.request_timeout_s == 570
    long_raw = ["serving.deployment_mode=RawDeployment", "serving.request_timeout_s=1200"]
    assert load_config(overrides=long_raw).serving.request_timeout_s == 1200
