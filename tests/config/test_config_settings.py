"""QuantDtype, QuantScheme, Granularity and TargetSettings: parsing, value ranges and block layouts."""

import pytest

from quantrain.config import Granularity, GranularityKind, QuantDtype, QuantScheme, TargetSettings

# Hand-computed narrow signed ranges [-(2^(b-1)) + 1, 2^(b-1) - 1] and full unsigned ranges [0, 2^b - 1].
SIGNED_RANGES = {2: (-1, 1), 3: (-3, 3), 4: (-7, 7), 5: (-15, 15), 6: (-31, 31), 7: (-63, 63), 8: (-127, 127)}
UNSIGNED_RANGES = {2: (0, 3), 3: (0, 7), 4: (0, 15), 5: (0, 31), 6: (0, 63), 7: (0, 127), 8: (0, 255)}


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_dtype_parses_to_bits_and_narrow_range(bits):
    dtype = QuantDtype.parse(f"int{bits}")
    assert dtype == QuantDtype(bits, True)
    assert dtype.name == f"int{bits}"
    assert (dtype.qmin, dtype.qmax) == SIGNED_RANGES[bits]


@pytest.mark.parametrize("bits", range(2, 9))
def test_unsigned_dtype_parses_to_bits_and_full_range(bits):
    dtype = QuantDtype.parse(f"uint{bits}")
    assert dtype == QuantDtype(bits, False)
    assert dtype.name == f"uint{bits}"
    assert (dtype.qmin, dtype.qmax) == UNSIGNED_RANGES[bits]


@pytest.mark.parametrize(
    ("name", "qmin", "qmax"),
    [("int8", -127, 127), ("int4", -7, 7), ("int2", -1, 1), ("uint8", 0, 255), ("uint2", 0, 3)],
)
def test_documented_value_ranges(name, qmin, qmax):
    dtype = QuantDtype.parse(name)
    assert (dtype.qmin, dtype.qmax) == (qmin, qmax)


def test_none_dtype_means_int8():
    dtype = QuantDtype.parse(None)
    assert dtype == QuantDtype(8, True)
    assert (dtype.name, dtype.qmin, dtype.qmax) == ("int8", -127, 127)


@pytest.mark.parametrize(
    "value", ["int9", "int1", "int0", "uint9", "uint1", "float8", "int", "uint", "Int8", "int8 ", " int8", "", "i8"]
)
def test_unknown_dtype_string_is_value_error(value):
    with pytest.raises(ValueError, match="unknown quant_dtype"):
        QuantDtype.parse(value)


@pytest.mark.parametrize("value", [8, 8.0, b"int8", ["int8"], True])
def test_non_string_dtype_is_type_error(value):
    with pytest.raises(TypeError):
        QuantDtype.parse(value)


def test_dtype_with_trailing_newline_is_rejected():
    with pytest.raises(ValueError):
        QuantDtype.parse("int8\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("symmetric", QuantScheme.SYMMETRIC), ("affine", QuantScheme.AFFINE), (None, QuantScheme.SYMMETRIC)],
)
def test_quant_scheme_parse(value, expected):
    assert QuantScheme.parse(value) is expected


@pytest.mark.parametrize("value", ["asymmetric", "Affine", "SYMMETRIC", ""])
def test_unknown_quant_scheme_is_value_error(value):
    with pytest.raises(ValueError, match="unknown quant_scheme"):
        QuantScheme.parse(value)


@pytest.mark.parametrize("value", [1, QuantScheme.AFFINE, ["affine"]])
def test_non_string_quant_scheme_is_type_error(value):
    with pytest.raises(TypeError):
        QuantScheme.parse(value)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, GranularityKind.PER_TENSOR),
        ("default", GranularityKind.PER_TENSOR),
        ("out_channel", GranularityKind.OUT_CHANNEL),
        ("in_channel", GranularityKind.IN_CHANNEL),
        ("per_channel", GranularityKind.PER_CHANNEL),
    ],
)
def test_granularity_parse_named_kinds(value, kind):
    granularity = Granularity.parse(value)
    assert granularity == Granularity(kind)
    assert granularity.block_sizes == ()
    assert granularity.spec == (value or "default")


@pytest.mark.parametrize(("value", "sizes"), [([1, -1], (1, -1)), ((2, 4), (2, 4)), ([-1], (-1,)), ([-1, 32, 1], (-1, 32, 1))])
def test_granularity_parse_block_lists(value, sizes):
    granularity = Granularity.parse(value)
    assert granularity.kind is GranularityKind.BLOCK
    assert granularity.block_sizes == sizes
    assert granularity.spec == list(sizes)


@pytest.mark.parametrize(
    ("value", "exc_type"),
    [
        ("block", ValueError),
        ("foo", ValueError),
        ("per_tensor", ValueError),
        ([], TypeError),
        ([0], ValueError),
        ([2, 0], ValueError),
        ([-2], ValueError),
        ([1.5], TypeError),
        ([True, -1], TypeError),
        (["1"], TypeError),
        (3, TypeError),
        ({"block": [1, -1]}, TypeError),
    ],
)
def test_bad_granularity_is_rejected(value, exc_type):
    with pytest.raises(exc_type):
        Granularity.parse(value)


@pytest.mark.parametrize(
    ("value", "shape", "expected"),
    [
        ("default", (4, 3, 3, 3), None),
        ("out_channel", (4, 3, 3, 3), (1, -1, -1, -1)),
        ("out_channel", (3, 4), (1, -1)),
        ("out_channel", (4,), (1,)),
        ("in_channel", (4, 3, 3, 3), (-1, 1, -1, -1)),
        ("in_channel", (3, 4), (-1, 1)),
        ("per_channel", (3, 4), (-1, 1)),
        ([2, -1], (4, 6), (2, -1)),
        ([-1, 3], (4, 6), (-1, 3)),
        ([4, 6], (4, 6), (4, 6)),
        ([1, 2, -1, -1], (4, 6, 3, 3), (1, 2, -1, -1)),
    ],
)
def test_block_shape_for_parameters(value, shape, expected):
    assert Granularity.parse(value).block_shape(shape, activation=False) == expected


@pytest.mark.parametrize(
    ("value", "shape", "expected"),
    [
        ("default", (8, 4, 5, 5), None),
        ("per_channel", (8, 4, 5, 5), (-1, 1, -1, -1)),
        ("in_channel", (8, 4), (-1, 1)),
        ([-1, 2], (5, 4), (-1, 2)),
        ([-1, -1, 5], (2, 3, 10), (-1, -1, 5)),
    ],
)
def test_block_shape_for_activations(value, shape, expected):
    assert Granularity.parse(value).block_shape(shape, activation=True) == expected


@pytest.mark.parametrize(
    ("value", "shape", "activation", "message"),
    [
        ([3, -1], (4, 6), False, "does not divide dim 0"),
        ([-1, 4], (4, 6), False, "does not divide dim 1"),
        ([2, -1], (4, 6, 1), False, "has 2 entries"),
        ([2, -1, 1], (4, 6), False, "has 3 entries"),
        ("in_channel", (4,), False, "at least 2 dims"),
        ("per_channel", (4,), True, "at least 2 dims"),
        ("out_channel", (), False, "at least 1 dims"),
        ("out_channel", (8, 4), True, "out_channel"),
        ([2, -1], (8, 4), True, "must start with -1"),
        ([1, -1], (8, 4), True, "must start with -1"),
    ],
)
def test_block_shape_that_does_not_fit_raises(value, shape, activation, message):
    with pytest.raises(ValueError, match=message):
        Granularity.parse(value).block_shape(shape, activation=activation)


def test_check_activation_accepts_per_tensor_per_channel_and_whole_batch_blocks():
    for value in ("default", "per_channel", "in_channel", [-1, 1]):
        Granularity.parse(value).check_activation()
    with pytest.raises(ValueError):
        Granularity.parse("out_channel").check_activation()


def test_target_settings_defaults_are_int8_symmetric_per_tensor():
    settings = TargetSettings()
    assert settings.dtype == QuantDtype(8, True)
    assert settings.scheme is QuantScheme.SYMMETRIC
    assert settings.granularity == Granularity(GranularityKind.PER_TENSOR)
    assert settings.apply_method is None
    assert (settings.qmin, settings.qmax) == (-127, 127)


def test_target_settings_ranges_follow_dtype():
    settings = TargetSettings(dtype=QuantDtype.parse("uint4"), scheme=QuantScheme.AFFINE)
    assert (settings.qmin, settings.qmax) == (0, 15)
