"""The applied-rewrite record and the provenance map in metadata_props (archpass/record.py)."""

from __future__ import annotations

import onnx
import pytest
from builders import NetBuilder

from archpass.record import PROVENANCE_KEY, read_provenance, read_record, write_provenance, write_record


@pytest.fixture
def proto() -> onnx.ModelProto:
    return NetBuilder((1, 3, 8, 8)).conv(4, k=1).build()


def test_record_round_trip_replaces_the_previous_one(proto):
    assert read_record(proto) is None
    write_record(proto, version="1", source_sha256="abc", rewrites=[{"pass": "p"}], recipe={"rewrites": []})
    write_record(proto, version="2", source_sha256="abc", rewrites=[{"pass": "q"}])
    rec = read_record(proto)
    assert rec == {"version": "2", "source_sha256": "abc", "recipe": None, "rewrites": [{"pass": "q"}]}
    assert sum(p.key == "archpass.version" for p in proto.metadata_props) == 1


def test_provenance_round_trip_keeps_other_metadata(proto):
    p = proto.metadata_props.add()
    p.key, p.value = "user.key", "kept"
    assert read_provenance(proto) == {}
    write_provenance(proto, {"conv0": ["fuse_ibn:block1"]})
    write_provenance(proto, {"conv0": ["fuse_ibn:block1", "channels:group2"], "conv1": ["channels:group2"]})
    assert read_provenance(proto) == {"conv0": ["fuse_ibn:block1", "channels:group2"], "conv1": ["channels:group2"]}
    assert [p.key for p in proto.metadata_props].count(PROVENANCE_KEY) == 1
    assert {p.key: p.value for p in proto.metadata_props}["user.key"] == "kept"


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", '"text"', '{"a": "not a list"}'])
def test_malformed_provenance_reads_as_empty(proto, value):
    p = proto.metadata_props.add()
    p.key, p.value = PROVENANCE_KEY, value
    assert read_provenance(proto) == {}
