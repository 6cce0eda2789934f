"""Safe decoding: every file of the generated bad-input corpus gives its expected image or error."""

import io

import pytest
from PIL import Image, ImageFile

from captioner.intake.decode import (
    ImageRejected,
    ImageTooLarge,
    NotAnImage,
    UnsupportedFormat,
    decode_image,
    open_image,
)
from tests.bad_inputs import bad_input_corpus, check_decoded, png_declaring

CORPUS = bad_input_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file(name):
    data, expected = CORPUS[name]
    if expected.error is None:
        check_decoded(decode_image(data), expected)
    else:
        with pytest.raises(expected.error) as info:
            decode_image(data)
        assert isinstance(info.value, ImageRejected)
        assert expected.reason_contains in info.value.reason
        assert str(info.value) == info.value.reason


def test_corpus_covers_the_issue_list(bad_inputs):
    names = set(bad_inputs)
    for needed in [
        "zero_bytes.jpg",
        "random_bytes.jpg",
        "page.html.jpg",
        "drawing.svg.jpg",
        "truncated.jpg",
        "bomb_40000x40000.png",
        "animated.gif",
        "cmyk.jpg",
        "sixteen_bit.png",
        "palette_transparent.png",
        "exif_rotated.jpg",
    ]:
        assert needed in names


def test_bomb_is_rejected_from_the_header(monkeypatch):
    # If the decoder ever ran, this would fail loudly instead of allocating 1.6 GB.
    def no_decode(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageTooLarge, match="1600000000 pixels"):
        decode_image(png_declaring(40_000, 40_000))


def test_pixel_limit_is_configurable():
    data = CORPUS["plain.bmp"][0]  # 8 x 6 = 48 pixels
    assert decode_image(data, max_pixels=48).size == (8, 6)
    with pytest.raises(ImageTooLarge, match="48 pixels > limit 47"):
        decode_image(data, max_pixels=47)
    assert open_image(data).size == (8, 6)


def test_byte_limit():
    data = CORPUS["plain.bmp"][0]
    with pytest.raises(ImageTooLarge, match=f"{len(data)} bytes > limit 100"):
        decode_image(data, max_bytes=100)


def test_formats_outside_the_list_are_not_decoded():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "TGA")  # PIL reads TGA, but we do not allow it
    with pytest.raises(NotAnImage):
        decode_image(buf.getvalue())
    with pytest.raises(UnsupportedFormat, match="PostScript"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_refuses_to_run_with_truncated_loading_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(CORPUS["plain.bmp"][0])


def test_decoding_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from captioner.intake.decode import decode_image; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
