"""Region metrics and the checks of the wire format."""

import inspect
import math

import numpy as np
import pytest
import torch
import zstandard
from nvflare.apis.dxo import DXO
from nvflare.apis.shareable import Shareable
from nvflare.fuel.f3.cellnet.cell import Adapter
from nvflare.fuel.utils.buffer_list import ConsumableBufferList

from split_unet.errors import ProtocolError
from split_unet.protocol.codecs import CODECS, DTYPES
from split_unet.protocol.nvflare_workarounds import short_received_buffer_repr
from split_unet.protocol.wire import (KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage, check_features, dxo_of,
                                      error_reply)
from split_unet.training import RegionMetrics, epoch_batches, logits_to_masks
from split_unet.training.metrics import MISSING_HD95_MM, lesion_wise


def _cube_masks():
    target = torch.zeros(1, 3, 16, 16, 16)
    target[:, :, 4:10, 4:10, 4:10] = 1
    return target


def test_perfect_prediction_scores_one_and_zero_distance():
    metrics = RegionMetrics()
    metrics.update(_cube_masks(), _cube_masks())
    result = metrics.aggregate()
    assert result["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0, "mean": 1.0}
    assert result["hd95"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}


def test_missed_region_scores_zero_dice_and_374_mm():
    prediction = _cube_masks()
    prediction[:, 2] = 0
    metrics = RegionMetrics()
    metrics.update(prediction, _cube_masks())
    result = metrics.aggregate()
    assert result["dice"]["ET"] == 0.0 and result["dice"]["WT"] == 1.0
    assert result["hd95"]["ET"] == MISSING_HD95_MM  # BraTS: a missed region scores 374 mm
    assert result["dice"]["mean"] == pytest.approx(2 / 3)


def test_hd95_is_in_millimetres_of_the_grid():
    prediction = torch.roll(_cube_masks(), 1, dims=2)  # one voxel off along x
    in_voxels, in_mm = RegionMetrics(), RegionMetrics()
    in_voxels.update(prediction, _cube_masks())
    cases = in_mm.update(prediction, _cube_masks(), [(2.0, 2.0, 2.0)])
    assert in_voxels.aggregate()["hd95"]["WT"] == pytest.approx(1.0)
    assert in_mm.aggregate()["hd95"]["WT"] == pytest.approx(2.0) == cases[0]["hd95"]["WT"]


def _ball(shape, centre, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


# HD95 (mm) that the BraTS 2023 evaluation (github.com/rachitsaluja/BraTS-2023-Metrics: surface_distance's
# compute_surface_distances then compute_robust_hausdorff(..., 95)) gives on these masks; MONAI's
# compute_hausdorff_distance(percentile=95) gives 2.236, 13.852, 3.000, 13.538, 1.414 and 17.321 instead.
_SHAPE = (48, 44, 40)
_TRUTH = _ball(_SHAPE, (24, 22, 20), (12, 10, 9))
_SHIFTED = _ball(_SHAPE, (26, 22, 21), (12, 11, 8))
_SPECKLE = np.random.default_rng(7).random(_SHAPE) > 0.998
BRATS_2023_HD95 = {
    "good 1 mm": (_SHIFTED, (1.0, 1.0, 1.0), 2.0),
    "speckled 1 mm": (_SHIFTED | _SPECKLE, (1.0, 1.0, 1.0), 13.892443989449804),
    "anisotropic": (_SHIFTED, (0.9375, 0.9375, 1.5), 2.57769882841266),
    "speckled anisotropic": (_SHIFTED | _SPECKLE, (0.5, 0.8, 2.0), 15.014659503298768),
    "eroded": (_ball(_SHAPE, (24, 22, 20), (11, 9, 8)), (1.0, 1.0, 1.0), 1.0),
    "a far lesion": (_TRUTH | _ball(_SHAPE, (6, 6, 6), (3, 4, 3)), (1.0, 1.0, 1.0), 16.76305461424021),
}


@pytest.mark.parametrize("case", sorted(BRATS_2023_HD95))
def test_hd95_is_the_brats_2023_evaluations(case):
    """Same surface elements (voxel corners, weighted by area) and the same percentile as the official code, to
    float64 rounding: distances are square roots of the same sums, the percentile an index into them."""
    prediction, spacing, official = BRATS_2023_HD95[case]
    masks = torch.from_numpy(np.stack([prediction] * 3))[None].float()
    target = torch.from_numpy(np.stack([_TRUTH] * 3))[None].float()
    (scores,) = RegionMetrics().update(masks, target, [spacing])
    assert scores["hd95"]["WT"] == pytest.approx(official, rel=1e-12)


def _cube(volume, corner, edge):
    x, y, z = corner
    volume[x:x + edge, y:y + edge, z:z + edge] = True
    return volume


def test_lesion_wise_counts_found_missed_and_false_lesions():
    truth = _cube(_cube(np.zeros((32,) * 3, bool), (4, 4, 4), 6), (20, 4, 4), 6)  # two lesions of 216 mm^3
    pred = _cube(_cube(np.zeros((32,) * 3, bool), (4, 4, 4), 6), (4, 20, 20), 3)  # the first, and a false one
    scores = lesion_wise(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 1, 1)
    assert scores["dice"] == pytest.approx((1 + 0 + 0) / 3)
    assert scores["hd95"] == pytest.approx((0 + 374 + 374) / 3)
    # A lesion of at most 50 mm^3 is not scored: missing it costs nothing, and finding it is no false lesion.
    small = _cube(truth.copy(), (26, 26, 26), 3)
    assert lesion_wise(pred, small) == scores
    assert lesion_wise(_cube(pred.copy(), (26, 26, 26), 3), small) == scores
    # Lesions closer than the dilation (2 voxels apart) are one lesion: half of it found, no miss.
    close = _cube(_cube(np.zeros((32,) * 3, bool), (4, 4, 4), 6), (12, 4, 4), 6)
    merged = lesion_wise(_cube(np.zeros((32,) * 3, bool), (4, 4, 4), 6), close)
    assert (merged["tp"], merged["fn"], merged["fp"]) == (1, 0, 0) and merged["dice"] == pytest.approx(2 / 3)
    # Nothing to find and nothing found: perfect; a false lesion on an empty truth: 0 / 374.
    empty = np.zeros((32,) * 3, bool)
    assert lesion_wise(empty, empty) == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    assert lesion_wise(pred, empty)["dice"] == 0.0 and lesion_wise(pred, empty)["hd95"] == MISSING_HD95_MM


def test_masks_are_nested_and_small_components_removable():
    logits = torch.full((1, 3, 16, 16, 16), -5.0)
    logits[:, 0, 4:10, 4:10, 4:10] = 5.0  # WT cube
    logits[:, 0, 14, 14, 14] = 5.0  # an isolated WT voxel
    logits[:, 1:, 6:8, 6:8, 2:8] = 5.0  # TC and ET reaching outside WT (z 2..3)
    masks = logits_to_masks(logits)
    assert masks[0, 0].sum() == 217 and masks[0, 1].sum() == masks[0, 2].sum() == 2 * 2 * 4  # inside WT only
    cleaned = logits_to_masks(logits, min_component_voxels=2)
    assert cleaned[0, 0].sum() == 216 and cleaned[0, 0, 14, 14, 14] == 0


def test_epoch_batches_are_seeded_and_cover_every_patient():
    ids = [f"P{i}" for i in range(7)]
    batches = epoch_batches(ids, 2, seed=1, epoch=0)
    assert batches == epoch_batches(ids, 2, seed=1, epoch=0) != epoch_batches(ids, 2, seed=1, epoch=1)
    assert sorted(sum(batches, [])) == ids and [len(b) for b in batches] == [2, 2, 2, 1]


def _activations(**meta):
    data = {"0": np.zeros((1, 4, 8, 8, 8), np.float32).tobytes()}
    encoding = {"codec": "float32", "shape": [1, 4, 8, 8, 8], "scale": 1.0}
    defaults = {"step": 1, "patient_ids": ["P1"], "encodings": {"0": encoding}}
    return DXO(KIND_ACTIVATIONS, data=data, meta={**defaults, **meta}).to_shareable()


@pytest.mark.parametrize("payload,field", [
    (Shareable(), "split_unet.activations"),
    (DXO(KIND_REQUEST, data={}).to_shareable(), "data_kind"),
    (_activations(step="1"), "step"),
    (_activations(patient_ids="P1"), "patient_ids"),
    (_activations(encodings={"0": {"codec": "float32", "shape": [1, 4, 8, 8, 8], "scale": -1.0}}), "scale"),
    (_activations(encodings={"0": {"codec": "bf8", "shape": [1, 4, 8, 8, 8], "scale": 1.0}}), "encoding"),
    (_activations(encodings={"0": {"codec": "float32", "shape": [1, 4, 8, 8], "scale": 1.0}}), "shape"),
    (error_reply("disk full"), "split_unet.activations"),
])
def test_malformed_messages_are_refused_naming_site_and_field(payload, field):
    with pytest.raises(ProtocolError) as raised:
        TensorMessage.from_shareable(payload, KIND_ACTIVATIONS, site="t2w")
    assert "site 't2w'" in str(raised.value) and field in str(raised.value)


def test_site_error_text_reaches_the_server():
    with pytest.raises(ProtocolError, match="disk full"):
        dxo_of(error_reply("disk full"), KIND_ACTIVATIONS, site="t1w")


@pytest.mark.parametrize("bad", [np.full((1, 4, 8, 8, 8), np.inf, np.float32).tobytes(),
                                 np.zeros((1, 4, 8, 8, 8), np.int64).tobytes(),
                                 np.zeros((1, 4, 8, 8, 8), np.float32),  # an array: the wire carries raw bytes
                                 [[0.0]]])
def test_non_finite_or_non_float_tensors_are_refused(bad):
    encoding = {"codec": "float32", "shape": [1, 4, 8, 8, 8], "scale": 1.0}
    payload = DXO(KIND_ACTIVATIONS, data={"0": bad}, meta={"step": 1, "patient_ids": [], "encodings": {"0": encoding}})
    with pytest.raises(ProtocolError, match=r"activations\[0\]"):
        TensorMessage.from_shareable(payload.to_shareable(), KIND_ACTIVATIONS, site="flair")


def test_feature_shapes_are_checked():
    features = {0: torch.zeros(1, 4, 8, 8, 8), 1: torch.zeros(1, 8, 4, 4, 4)}
    check_features(features, {0: (1, 4, 8, 8, 8), 1: (1, 8, 4, 4, 4)}, site="s")
    with pytest.raises(ProtocolError, match=r"activations\[1\]"):
        check_features(features, {0: (1, 4, 8, 8, 8), 1: (1, 8, 2, 2, 2)}, site="s")
    with pytest.raises(ProtocolError, match="levels"):
        check_features({0: features[0]}, {0: (1, 4, 8, 8, 8), 1: (1, 8, 4, 4, 4)}, site="s")


@pytest.mark.parametrize("codec,max_error,byte_ratio", [("float32", 0.0, 1.0), ("float16", 2e-3, 0.5),
                                                        ("int8", 1 / 254, 0.25)])
def test_codecs_bound_their_error_and_bytes(codec, max_error, byte_ratio):
    # Seeded: int8's reconstruction q * scale is itself rounded to float32, which in ~0.3 % of random draws puts
    # one element a rounding error past half a step; the bound below is the codec's exact-arithmetic claim.
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-6, 1e-2, 1.0, 100.0]).view(1, 4, 1, 1, 1)
    tensor = torch.randn(2, 4, 8, 8, 8, generator=generator) * scales
    shareable, n_bytes = TensorMessage(KIND_ACTIVATIONS, 1, [], {0: tensor}).to_shareable(codec)
    decoded = TensorMessage.from_shareable(shareable, KIND_ACTIVATIONS, site="s")
    assert n_bytes == decoded.wire_bytes == int(tensor.numel() * 4 * byte_ratio)
    peaks = tensor.abs().amax(dim=(0, 2, 3, 4), keepdim=True)
    scale = peaks if codec == "int8" else tensor.abs().max()  # per channel for int8, per tensor otherwise
    assert ((decoded.tensors[0] - tensor).abs() <= max_error * scale + 1e-12).all()


def test_topk_keeps_the_largest_entries_and_their_positions():
    tensor = torch.zeros(1, 2, 4, 4, 4)
    tensor[0, 1, 2, 3, 1], tensor[0, 0, 0, 0, 0] = 5.0, -3.0
    shareable, n_bytes = TensorMessage(KIND_ACTIVATIONS, 1, [], {0: tensor}).to_shareable("topk", keep_fraction=0.02)
    decoded = TensorMessage.from_shareable(shareable, KIND_ACTIVATIONS, site="s").tensors[0]
    assert torch.allclose(decoded, tensor, rtol=1e-3) and n_bytes == 3 * (2 + 4)


@pytest.mark.parametrize("codec", CODECS)
def test_tensors_travel_as_raw_bytes_of_the_codecs_dtype(codec):
    """No numpy array in the DXO (NVFlare's FOBS would send it through its download service): contiguous bytes,
    exactly as many as the codec's dtype needs for the declared shape."""
    tensor = torch.randn(2, 4, 8, 8, 8)
    message = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], {0: tensor})
    shareable, n_bytes = message.to_shareable(codec, keep_fraction=0.25)
    data = shareable["DXO"]["data"]
    assert all(type(value) is bytes for value in data.values())
    kept = math.ceil(0.25 * tensor.numel())
    expected = kept * (2 + 4) if codec == "topk" else tensor.numel() * DTYPES[codec].itemsize
    assert n_bytes == sum(len(value) for value in data.values()) == expected
    received = TensorMessage.from_shareable(shareable, KIND_ACTIVATIONS, site="flair")
    assert received.wire_bytes == n_bytes and received.tensors[0].shape == tensor.shape


@pytest.mark.parametrize("codec", ["float32", "float16", "topk"])
def test_one_non_finite_value_anywhere_is_refused(codec):
    """The finiteness check looks at the minimum and maximum of the decoded tensor: one NaN or Inf at any position,
    the first, the last or in between, makes the message invalid."""
    shape = [2, 4, 9, 9, 9]  # an odd size: the last values fall outside any vector width
    for position in (0, 1, 4095, math.prod(shape) - 1):
        for bad in (np.nan, np.inf, -np.inf):
            dtype = DTYPES[codec]
            values = np.zeros(math.prod(shape), dtype)
            data = {}
            if codec == "topk":
                values, indices = np.zeros(position + 1, dtype), np.arange(position + 1, dtype=np.int32)
                data["0:indices"] = indices.tobytes()
            values[-1 if codec == "topk" else position] = bad
            data["0"] = values.tobytes()
            payload = DXO(KIND_ACTIVATIONS, data=data, meta={"step": 1, "patient_ids": [], "encodings": {
                "0": {"codec": codec, "shape": shape, "scale": 1.0}}}).to_shareable()
            with pytest.raises(ProtocolError, match=r"activations\[0\].*NaN/Inf"):
                TensorMessage.from_shareable(payload, KIND_ACTIVATIONS, site="flair")


def _skull_stripped(shape=(2, 4, 16, 16, 16)) -> torch.Tensor:
    """Activations of a skull-stripped volume: constant outside a brain-sized core."""
    tensor = torch.full(shape, 0.25)
    tensor[..., 4:12, 4:12, 4:12] = torch.randn(*shape[:2], 8, 8, 8, generator=torch.Generator().manual_seed(0))
    return tensor


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_tensors_decode_to_what_uncompressed_ones_do(codec):
    tensor = _skull_stripped()
    plain, plain_bytes = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], {0: tensor}).to_shareable(codec)
    packed, packed_bytes = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], {0: tensor}).to_shareable(codec,
                                                                                                 compression="zstd")
    assert packed["DXO"]["meta"]["encodings"]["0"]["compression"] == "zstd"
    received = TensorMessage.from_shareable(packed, KIND_ACTIVATIONS, site="flair")
    assert torch.equal(received.tensors[0], TensorMessage.from_shareable(plain, KIND_ACTIVATIONS, site="s").tensors[0])
    # 7/8 of every channel is constant: compression at least halves the dense codecs' bytes (top-k sends only the
    # largest entries, none of the constant ones, so only its sorted indices shrink).
    assert received.wire_bytes == packed_bytes < plain_bytes * (0.9 if codec == "topk" else 0.5)


def _compressed(frame: bytes, **header) -> Shareable:
    encoding = {"codec": "float16", "shape": [1, 4, 8, 8, 8], "scale": 1.0, "compression": "zstd", **header}
    return DXO(KIND_ACTIVATIONS, data={"0": frame}, meta={"step": 1, "patient_ids": ["P1"],
                                                          "encodings": {"0": encoding}}).to_shareable()


@pytest.mark.parametrize("frame,header,message", [
    # A frame that would decompress to 1 GB more than the declared shape: refused from its header alone.
    (zstandard.ZstdCompressor().compress(bytes(2**20)), {}, "declares 1048576 bytes"),
    # No declared size (a streamed frame): its size would only be known by decompressing it.
    (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096)), {}, "declares -1 bytes"),
    (zstandard.ZstdCompressor().compress(bytes(4096))[:-4], {}, "corrupt zstd"),
    (zstandard.ZstdCompressor().compress(bytes(4096)) * 2, {}, "corrupt zstd"),  # trailing data
    (b"not zstd", {}, "corrupt zstd"),
    (zstandard.ZstdCompressor().compress(bytes(4096)), {"compression": "gzip"}, "unknown compression"),
    (zstandard.ZstdCompressor().compress(bytes(4095)), {}, "4095 bytes, not the 2048"),  # decompressed, then checked
    (np.zeros(8), {}, "expected compressed bytes"),
])
def test_hostile_compressed_fields_are_refused_before_they_are_inflated(frame, header, message):
    with pytest.raises(ProtocolError, match=message) as raised:
        TensorMessage.from_shareable(_compressed(frame, **header), KIND_ACTIVATIONS, site="t1w")
    assert "site 't1w'" in str(raised.value) and "activations[0]" in str(raised.value)


def test_an_unknown_compression_setting_is_refused_by_every_sender():
    with pytest.raises(ValueError, match="compression must be None or one of"):
        TensorMessage(KIND_ACTIVATIONS, 1, [], {0: torch.zeros(1, 1, 2, 2, 2)}).to_shareable("float16",
                                                                                            compression="lz4")


def test_a_received_payload_is_no_longer_formatted_byte_by_byte_for_nvflares_debug_line():
    """NVFlare 2.9 formats every streamed request's payload into a debug f-string (``Adapter.call``); this test fails
    when NVFlare stops doing so, and ``short_received_buffer_repr`` can go."""
    assert "incoming data={result}" in inspect.getsource(Adapter.call)
    short_received_buffer_repr()
    received = ConsumableBufferList([bytes(2**20)] * 11)
    assert f"incoming data={received}" == "incoming data=<ConsumableBufferList: 11 buffers, 11534336 bytes>"
