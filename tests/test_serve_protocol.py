"""Request parsing and response encoding (``ldm_core.serve.protocol``), without a server.

V2 requests are built the way the server receives them: a JSON body through KServe's own
REST models (``InferenceRequest`` -> ``InferRequest.from_inference_request``), a gRPC
message through ``InferRequest.from_grpc``; responses are read back through KServe's own
``to_rest`` / ``to_grpc``, i.e. as a client gets them.
"""

from __future__ import annotations

import base64
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceRequest

from ldm_core.serve.protocol import (
    MAX_SEED,
    GenerationRequest,
    Limits,
    build_v1_response,
    build_v2_response,
    encode,
    parse_v1,
    parse_v2,
)
from tests.harness.configs import MODEL, serve_config
from tests.harness.serving import v2

LIMITS = Limits(
    max_samples=3, max_steps=50, samplers=("ddim", "ddpm"), default_sampler="ddim", default_steps=7
)
DIGEST = "ab" * 32
AFFINE = np.diag([2.0, 3.0, 4.0, 1.0])
VOLUMES = np.random.default_rng(0).random((2, 1, 4, 5, 6), dtype=np.float32)


def rest(body: dict) -> InferRequest:
    """``body`` as the server's REST route hands it to the model."""
    return InferRequest.from_inference_request(InferenceRequest.model_validate(body), MODEL)


def parsed(body: dict) -> GenerationRequest:
    return parse_v2(rest(body), LIMITS, "req-1")


# --------------------------------------------------------------------------- limits


def test_limits_follow_the_server_config_and_the_bundle_objective():
    limits = Limits.from_config(
        serve_config("serving.max_steps=40", "sampling.steps=60"), serve_config()
    )
    assert limits.samplers == ("ddim", "ddpm") and limits.max_samples == 3
    assert limits.max_steps == 40 and limits.default_steps == 40  # clamped to the limit
    rflow = serve_config(
        "model.scheduler.objective=rflow", "sampling.sampler=rflow", "train.diffusion.snr_gamma=0"
    )
    limits = Limits.from_config(serve_config("sampling.sampler=ddpm"), rflow)
    # A sampler the bundle's objective cannot use is never the default.
    assert limits.samplers == ("rflow",) and limits.default_sampler == "rflow"
    few = serve_config("model.scheduler.num_train_timesteps=20")
    assert Limits.from_config(serve_config(), few).max_steps == 20


# --------------------------------------------------------------------------- V2 parsing


def test_v2_defaults_and_the_output_shortcut():
    req = parsed(v2([4, 2]))
    assert (req.seeds, req.sampler, req.steps) == ([4, 2], "ddim", 7)
    # Neither outputs nor the shortcut: every output, as the protocol says.
    assert req.outputs == ("volume", "affine", "nifti", "png") and req.protocol == "v2"
    assert parsed(v2([4], output="nifti", sampler="ddpm", steps=3)).outputs == ("nifti",)
    assert parsed(v2([4], output="volume")).outputs == ("volume", "affine")
    assert parsed(v2([4], datatype="INT32")).seeds == [4]


def test_v2_outputs_field_wins_keeps_its_order_and_unknown_parameters_are_listed():
    body = {**v2([1], output="nifti", trace="x", zeta=1), "outputs": [{"name": "png"}]}
    body["outputs"].append({"name": "affine"})
    req = parsed(body)
    assert req.outputs == ("png", "affine")
    assert req.ignored_parameters == ("trace", "zeta")


def test_v2_seeds_from_grpc_raw_contents():
    tensor = pb.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[3])
    message = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[tensor],
        raw_input_contents=[np.asarray([5, 0, MAX_SEED], dtype="<i8").tobytes()],
    )
    assert parse_v2(InferRequest.from_grpc(message), LIMITS, "g").seeds == [5, 0, MAX_SEED]


BAD_V2 = [
    ("no input", {"inputs": []}, "inputs: exactly one input"),
    (
        "unknown input",
        {"inputs": [{"name": "noise", "shape": [1], "datatype": "INT64", "data": [1]}]},
        "inputs[0].name",
    ),
    ("two seed inputs", {"inputs": v2([1])["inputs"] * 2}, "inputs: exactly one"),
    ("float datatype", v2([1], datatype="FP32"), "inputs[seed].datatype"),
    ("2-D shape", v2([[1]], shape=[1, 1]), "inputs[seed].shape"),
    ("count mismatch", v2([1], shape=[2]), "inputs[seed].data: 1 values"),
    ("no seeds", v2([]), "at least one seed"),
    ("too many", v2([1, 2, 3, 4]), "serving.max_samples"),
    ("negative", v2([-1]), "outside 0.."),
    ("too large", v2([MAX_SEED + 1]), "outside 0.."),
    ("boolean seed", v2([True]), "seed must be an integer"),
    ("steps zero", v2([1], steps=0), "parameters.steps: 0 is outside 1..50"),
    ("steps over", v2([1], steps=51), "parameters.steps: 51 is outside 1..50"),
    ("steps boolean", v2([1], steps=True), "parameters.steps: expected an integer"),
    ("steps float", v2([1], steps=2.5), "parameters.steps: expected an integer"),
    ("unknown sampler", v2([1], sampler="euler"), "parameters.sampler: 'euler' is not one of"),
    ("other objective", v2([1], sampler="rflow"), "cannot sample this model"),
    ("unknown output", v2([1], output="gif"), "parameters.output"),
    ("binary flag", v2([1], binary_data_output="yes"), "parameters.binary_data_output"),
    ("unknown tensor", {**v2([1]), "outputs": [{"name": "mask"}]}, "outputs[0].name"),
    (
        "per-output flag",
        {**v2([1]), "outputs": [{"name": "png", "parameters": {"binary_data": 1}}]},
        "outputs[0].parameters.binary_data",
    ),
    (
        "tensor twice",
        {**v2([1]), "outputs": [{"name": "png"}, {"name": "affine"}, {"name": "png"}]},
        "outputs[2].name: 'png' is asked for twice (also outputs[0])",
    ),
]


@pytest.mark.parametrize("what, body, message", BAD_V2, ids=[c[0] for c in BAD_V2])
def test_a_bad_v2_request_is_invalid_input_naming_the_field(what, body, message):
    with pytest.raises(InvalidInput) as err:
        parsed(body)
    assert message in str(err.value)


# --------------------------------------------------------------------------- V1 parsing


def test_v1_defaults_to_nifti_and_reads_its_parameters():
    req = parse_v1({"instances": [{"seed": 3}, {"seed": 4}]}, LIMITS, "v1")
    assert (req.seeds, req.outputs, req.protocol) == ([3, 4], ("nifti",), "v1")
    req = parse_v1(
        {"instances": [{"seed": 3}], "parameters": {"output": "volume", "steps": 2, "x": 1}},
        LIMITS,
        "v1",
    )
    assert req.outputs == ("volume", "affine") and req.steps == 2
    assert req.ignored_parameters == ("x",)


BAD_V1 = [
    ("bytes", b"{}", "expected JSON"),
    ("list", [1], "expected a JSON object"),
    ("unknown field", {"instances": [{"seed": 1}], "inputs": []}, "inputs: unknown field"),
    ("instances not a list", {"instances": {"seed": 1}}, "instances: expected a list"),
    ("extra key", {"instances": [{"seed": 1, "n": 2}]}, "instances[0]"),
    ("string seed", {"instances": [{"seed": "1"}]}, "instances[0].seed"),
    ("parameters", {"instances": [{"seed": 1}], "parameters": [1]}, "parameters: expected"),
]


@pytest.mark.parametrize("what, body, message", BAD_V1, ids=[c[0] for c in BAD_V1])
def test_a_bad_v1_request_is_invalid_input_naming_the_field(what, body, message):
    with pytest.raises(InvalidInput) as err:
        parse_v1(body, LIMITS, "v1")
    assert message in str(err.value)


# --------------------------------------------------------------------------- encoding


def test_encode_makes_one_file_per_volume_of_each_kind_asked():
    files = encode(VOLUMES, AFFINE, ("nifti", "png"))
    assert [len(files["nifti"]), len(files["png"])] == [2, 2]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(files["nifti"][1]))
    np.testing.assert_allclose(image.get_fdata(), VOLUMES[1, 0], atol=1e-6)
    np.testing.assert_allclose(image.affine, AFFINE)
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in files["png"])
    assert encode(VOLUMES, AFFINE, ("volume", "affine")) == {}


def _v2_response(body: dict):
    req = parsed(body)
    files = encode(VOLUMES, AFFINE, req.outputs)
    return build_v2_response(req, VOLUMES, AFFINE, files, MODEL, DIGEST)


def test_v2_response_in_json_names_the_bundle_and_base64_encodes_files():
    response = _v2_response(
        {**v2([4, 5], steps=3), "outputs": [{"name": "nifti"}, {"name": "volume"}]}
    )
    answer, _ = response.to_rest()
    assert answer["model_version"] == DIGEST and answer["id"] == "req-1"
    assert answer["parameters"] == {"sampler": "ddim", "steps": 3, "bundle_digest": DIGEST}
    nifti, volume = answer["outputs"]
    assert (nifti["name"], nifti["shape"], nifti["datatype"]) == ("nifti", [2], "BYTES")
    assert nifti["parameters"] == {"content_type": "application/gzip", "encoding": "base64"}
    assert gzip.decompress(base64.b64decode(nifti["data"][0]))[:4]  # a gzip stream
    assert volume["shape"] == [2, 1, 4, 5, 6]
    np.testing.assert_allclose(np.asarray(volume["data"]).reshape(VOLUMES.shape), VOLUMES)


def test_v2_response_sends_raw_bytes_exactly_where_binary_was_asked():
    body = {
        **v2([4, 5]),
        "outputs": [{"name": "png", "parameters": {"binary_data": True}}, {"name": "nifti"}],
    }
    raw, header_length = _v2_response(body).to_rest()
    header = json.loads(raw[:header_length])
    png, nifti = header["outputs"]
    assert "encoding" not in png["parameters"] and "data" not in png
    assert nifti["parameters"]["encoding"] == "base64" and len(nifti["data"]) == 2
    blob = raw[header_length:]
    assert len(blob) == png["parameters"]["binary_data_size"]
    assert blob[4:12] == b"\x89PNG\r\n\x1a\n"  # a BYTES element: 4-byte length, then the file
    # binary_data_output asks it of every output.
    raw, header_length = _v2_response(v2([4], binary_data_output=True)).to_rest()
    outputs = json.loads(raw[:header_length])["outputs"]
    assert [o["name"] for o in outputs] == ["volume", "affine", "nifti", "png"]
    assert not any("data" in o for o in outputs)
    assert sum(o["parameters"]["binary_data_size"] for o in outputs) == len(raw) - header_length


def test_v2_response_to_a_grpc_request_carries_bytes_as_bytes():
    tensor = pb.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[2])
    message = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[tensor],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="png")],
        raw_input_contents=[np.asarray([4, 5], dtype="<i8").tobytes()],
    )
    req = parse_v2(InferRequest.from_grpc(message), LIMITS, "g")
    files = encode(VOLUMES, AFFINE, req.outputs)
    answer = build_v2_response(req, VOLUMES, AFFINE, files, MODEL, DIGEST).to_grpc()
    assert answer.model_version == DIGEST and [o.name for o in answer.outputs] == ["png"]
    (contents,) = answer.raw_output_contents
    assert contents[4:12] == b"\x89PNG\r\n\x1a\n"


def test_v2_response_needs_the_v2_request():
    req = parse_v1({"instances": [{"seed": 1}]}, LIMITS, "v1")
    with pytest.raises(ValueError, match="needs the V2 request"):
        build_v2_response(req, VOLUMES[:1], AFFINE, {}, MODEL, DIGEST)


def test_v1_response_has_one_prediction_per_seed():
    req = parse_v1({"instances": [{"seed": 8}, {"seed": 9}]}, LIMITS, "v1")
    answer = build_v1_response(req, VOLUMES, AFFINE, encode(VOLUMES, AFFINE, req.outputs), DIGEST)
    assert [p["seed"] for p in answer["predictions"]] == [8, 9]
    image = nib.Nifti1Image.from_bytes(
        gzip.decompress(base64.b64decode(answer["predictions"][0]["nifti"]))
    )
    np.testing.assert_allclose(image.get_fdata(), VOLUMES[0, 0], atol=1e-6)
    assert answer["affine"] == AFFINE.tolist() and answer["bundle_digest"] == DIGEST
    assert (answer["sampler"], answer["steps"]) == ("ddim", 7)
    req = parse_v1({"instances": [{"seed": 8}], "parameters": {"output": "volume"}}, LIMITS, "v")
    answer = build_v1_response(req, VOLUMES[:1], AFFINE, {}, DIGEST)
    np.testing.assert_allclose(answer["predictions"][0]["volume"], VOLUMES[0])
