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


def _photo() -> Image.Image:
    im = Image.new("RGB", (32, 24), (200, 40, 10))
    im.paste((20, 60, 220), (0, 0, 16, 24))  # left half blue, right half red
    return im


def _check_photo(im: Image.Image) -> None:
    assert im.mode == "RGB" and im.size == (32, 24)
    for xy, colour in (((4, 12), (20, 60, 220)), ((28, 12), (200, 40, 10))):
        assert all(abs(a - b) <= 12 for a, b in zip(im.getpixel(xy), colour, strict=True)), xy


def test_avif_is_accepted_and_decoded():
    from PIL import features

    from captioner.intake.uploads import IMAGE_SUFFIXES, check_image_bytes

    assert features.check("avif")  # the pinned Pillow decodes AVIF itself
    buf = io.BytesIO()
    _photo().save(buf, "AVIF", quality=95)
    data = buf.getvalue()
    assert data[4:12] == b"ftypavif"
    check_image_bytes("photo.avif", data)  # the upload check accepts it
    assert open_image(data).format == "AVIF"
    _check_photo(decode_image(data))
    assert ".avif" in IMAGE_SUFFIXES


def test_heic_is_accepted_and_decoded():
    import pillow_heif

    from captioner.intake.uploads import IMAGE_SUFFIXES, check_image_bytes

    buf = io.BytesIO()
    # Encoded by pillow-heif directly: nothing is registered with PIL by making the file.
    pillow_heif.from_pillow(_photo()).save(buf, quality=95)
    data = buf.getvalue()
    assert data[4:12] == b"ftypheic"
    check_image_bytes("IMG_0001.HEIC", data)
    assert open_image(data).format == "HEIF"
    _check_photo(decode_image(data))
    assert ".heic" in IMAGE_SUFFIXES and ".heif" in IMAGE_SUFFIXES


def test_a_broken_avif_or_heic_is_corrupt_not_unsupported():
    for fmt, brand in (("AVIF", b"avif"), ("HEIC", b"heic")):
        data = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00" + b"junk" * 40
        with pytest.raises(ImageRejected, match=f"corrupt image: unreadable {fmt}"):
            decode_image(data)


def test_heif_opener_is_registered_lazily_on_the_first_heif_file():
    import subprocess
    import sys

    code = """
import io, sys
from PIL import Image
from captioner.intake.decode import decode_image
buf = io.BytesIO()
Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, "PNG")
decode_image(buf.getvalue())
assert "pillow_heif" not in sys.modules and "HEIF" not in Image.OPEN, "registered too early"
import pillow_heif
buf = io.BytesIO()
pillow_heif.from_pillow(Image.new("RGB", (8, 8), (9, 9, 9))).save(buf)
assert "HEIF" not in Image.OPEN
assert decode_image(buf.getvalue()).size == (8, 8)
assert "HEIF" in Image.OPEN
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_large_jpeg_is_drafted_no_smaller_than_the_target_rotation_included():
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees: 1000x2400 stored, 2400x1000 shown
    buf = io.BytesIO()
    Image.new("RGB", (1000, 2400), (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    assert decode_image(data).size == (2400, 1000)
    drafted = decode_image(data, target_size=(224, 224))
    assert drafted.size == (600, 250) and drafted.mode == "RGB"  # 1/4: both sides >= 224
    assert decode_image(data, target_size=(400, 400)).size == (1200, 500)  # 1/2
    assert decode_image(data, target_size=(600, 600)).size == (2400, 1000)  # under 2x: full
    png = io.BytesIO()
    Image.new("RGB", (1000, 2400)).save(png, "PNG")
    assert decode_image(png.getvalue(), target_size=(224, 224)).size == (1000, 2400)
