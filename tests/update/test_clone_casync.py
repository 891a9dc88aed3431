"""Cloning from casync: `casync make` builds the .caibx and .castr of real ext4 images; the
clone must rebuild the image byte for byte, from a local store or over HTTP, with seeds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from btrdelta.chunk.casync import chunk_file_name, decode_caibx
from btrdelta.cli import main
from btrdelta.errors import BtrdeltaError, ChecksumError, MissingBaseError
from btrdelta.transport.server import StaticServer
from btrdelta.update.clone import clone_image
from tests.chunk.images import ImagePair
from tests.chunk.test_casync import casync_make


@pytest.fixture(scope="module")
def casync_pair(image_pair: ImagePair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """www/v1.caibx, www/v2.caibx and one www/default.castr holding both (16 KiB chunks)."""
    www = tmp_path_factory.mktemp("casync") / "www"
    www.mkdir()
    for name, img in (("v1", image_pair.img1), ("v2", image_pair.img2)):
        index, _ = casync_make(img, www, "--chunk-size=16384", f"--store={www}/default.castr")
        index.rename(www / f"{name}.caibx")
    return www


def test_clone_rebuilds_the_image_casync_made(
    casync_pair: Path, image_pair: ImagePair, tmp_path: Path
) -> None:
    out = tmp_path / "v2.img"
    r = clone_image(str(casync_pair / "v2.caibx"), output=str(out))  # default.castr beside it
    assert out.read_bytes() == image_pair.img2.read_bytes()
    assert r.kind == "casync"
    assert r.fetched == r.chunks
    # with v1 as a seed, cut the casync way: only the chunks v1 lacks are read
    out2 = tmp_path / "v2-seeded.img"
    r2 = clone_image(str(casync_pair / "v2.caibx"), output=str(out2),
                     seeds=[str(image_pair.img1)])
    assert out2.read_bytes() == image_pair.img2.read_bytes()
    assert r2.fetched < r.fetched // 4
    assert r2.out_from_seeds > image_pair.img2.stat().st_size // 2
    with pytest.raises(BtrdeltaError, match="--output only"):
        clone_image(str(casync_pair / "v2.caibx"), target=f"{tmp_path}/store/v2")


def test_clone_over_http_in_place_onto_the_old_version(
    casync_pair: Path, image_pair: ImagePair, tmp_path: Path
) -> None:
    slot = tmp_path / "slot-b.img"
    shutil.copyfile(image_pair.img1, slot)
    server = StaticServer(casync_pair)
    with server.running():
        dry = clone_image(f"{server.url}/v2.caibx", output=str(slot), in_place=True,
                          castr=[f"{server.url}/default.castr"], dry_run=True)
        r = clone_image(f"{server.url}/v2.caibx", output=str(slot), in_place=True,
                        castr=[f"{server.url}/default.castr"])
    assert slot.read_bytes() == image_pair.img2.read_bytes()
    assert r.fetched == dry.fetch_chunks < r.chunks // 4
    index = decode_caibx((casync_pair / "v2.caibx").read_bytes())
    assert r.requests == r.fetched + 1  # the index, then one GET per missing chunk
    sent = sum((casync_pair / "default.castr" / chunk_file_name(index.digests[e])).stat().st_size
               for e in range(len(index.digests)))
    assert r.bytes_received < sent // 4


def test_stores_are_tried_in_order_and_chunks_checked(
    casync_pair: Path, image_pair: ImagePair, tmp_path: Path
) -> None:
    index = decode_caibx((casync_pair / "v1.caibx").read_bytes())
    cache = tmp_path / "cache.castr"  # a local cache holding one damaged and some chunks
    for entry in range(0, len(index.digests), 3):
        name = chunk_file_name(index.digests[entry])
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(casync_pair / "default.castr" / name, cache / name)
    victim = cache / chunk_file_name(index.digests[0])
    other = (casync_pair / "default.castr" / chunk_file_name(index.digests[1])).read_bytes()
    victim.write_bytes(other)  # a valid chunk file, but of another chunk
    out = tmp_path / "v1.img"
    clone_image(str(casync_pair / "v1.caibx"), output=str(out),
                castr=[str(cache), str(casync_pair / "default.castr")])
    assert out.read_bytes() == image_pair.img1.read_bytes()
    full = tmp_path / "full.castr"  # every chunk, one of them damaged, and no other store
    shutil.copytree(casync_pair / "default.castr", full)
    (full / chunk_file_name(index.digests[0])).write_bytes(other)
    with pytest.raises(ChecksumError):
        clone_image(str(casync_pair / "v1.caibx"), output=str(tmp_path / "x"),
                    castr=[str(full)])
    empty = tmp_path / "empty.castr"
    empty.mkdir()
    with pytest.raises(MissingBaseError, match="none of the stores"):
        clone_image(str(casync_pair / "v1.caibx"), output=str(tmp_path / "y"),
                    castr=[str(empty)])
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()


def test_cli_clone_and_info_of_a_caibx(
    casync_pair: Path, image_pair: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v1.img"
    assert main(["image", "clone", "--json", str(casync_pair / "v1.caibx"), "--output",
                 str(out), "--castr", str(casync_pair / "default.castr")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "casync"
    assert out.read_bytes() == image_pair.img1.read_bytes()
    # a casync store lists no sizes: what it fetched is counted uncompressed, and said so
    # (it said "fetched 1393 (106.0 MiB + ...); ..., 52.5 MiB received")
    assert main(["image", "clone", str(casync_pair / "v1.caibx"), "--output",
                 str(tmp_path / "again.img"), "--castr", str(casync_pair / "default.castr")]) == 0
    said = capsys.readouterr().out
    assert re.search(r"fetched \d+ \([\d.]+ [KM]iB uncompressed \+ [\d.]+ KiB index\); ",
                     said), said
    assert main(["image", "info", "--json", str(casync_pair / "v1.caibx")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_size"] == image_pair.img1.stat().st_size
    assert info["chunker"] == {"name": "buzhash", "min": 4096, "avg": 16384, "max": 65536}
    # options a casync index cannot take are usage errors (exit 2; they were 1)
    assert main(["image", "clone", str(casync_pair / "v1.caibx"), f"{tmp_path}/s/v1"]) == 2
    assert "--output only" in capsys.readouterr().err
    from btrdelta import trust

    trust.save_key_pair(trust.generate_key(), str(tmp_path / "k.pem"), str(tmp_path / "k.pub"))
    assert main(["image", "clone", str(casync_pair / "v1.caibx"), "--output",
                 str(tmp_path / "k.img"), "--key", str(tmp_path / "k.pub")]) == 2
    assert "casync indexes are not signed" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "k.img").exists()


def test_cli_clone_of_a_caibx_whose_store_is_not_the_default(
    casync_pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `casync make` names its store INDEX.castr unless told: without --castr the clone looked
    # in default.castr next to the index and said only "chunk X is in none of the stores"
    elsewhere = tmp_path / "www"
    elsewhere.mkdir()
    shutil.copy(casync_pair / "v1.caibx", elsewhere)
    out = tmp_path / "v1.img"
    assert main(["image", "clone", str(elsewhere / "v1.caibx"), "--output", str(out)]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"btrdelta image clone: error: {elsewhere}/default.castr: chunk ")
    assert ("is not in the default store (default.castr next to the index): name the "
            "index's store with --castr") in err
    assert not out.exists()
