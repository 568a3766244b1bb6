"""The HTTP cache door's sans-I/O pieces: path routing, ccache keys, auth, status codes."""

from __future__ import annotations

import base64
import hashlib

import pytest

from triode.errors import (
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TooLarge,
    TriodeError,
)
from triode.node.httpcache import (
    Route,
    RouteError,
    auth_failure,
    ccache_key,
    credentials_match,
    route,
    status_of,
)

H = hashlib.sha256(b"an action").hexdigest()
# ccache 4.7.5's own paths for one key, in its three layouts (seen from a real ccache run).
CCACHE_TEXT = "a7750f919mrb75p5n9390jr6hcfrtmdkg"
CCACHE_HEX40 = "a77503d214db6b39725ba46904f668b1fbed9b48"
CCACHE_BAZEL = CCACHE_HEX40 + CCACHE_HEX40[:24]


def test_bazel_remote_layout_with_and_without_an_instance():
    assert route(f"/cas/{H}") == Route("cas", H, "")
    assert route(f"/ac/{H}") == Route("ac", H, "")
    assert route(f"/main/cas/{H}") == Route("cas", H, "main")
    assert route(f"/a/b/ac/{H}") == Route("ac", H, "a/b")
    assert route("/metrics") == Route("metrics")


def test_the_three_ccache_layouts_name_one_key():
    subdirs = route(f"/ns/{CCACHE_TEXT[:2]}/{CCACHE_TEXT[2:]}")
    flat = route(f"/ns/{CCACHE_TEXT}")
    bazel = route(f"/ns/ac/{CCACHE_BAZEL}")
    assert subdirs == flat == bazel == Route("ccache", CCACHE_HEX40, "ns")
    assert subdirs.namespace == "ccache/ns"
    assert route(f"/{CCACHE_TEXT}") == Route("ccache", CCACHE_HEX40, "")
    assert route(f"/{CCACHE_TEXT}").namespace == "ccache"


def test_ccache_key_decoding():
    assert ccache_key(CCACHE_TEXT) == CCACHE_HEX40
    assert ccache_key(CCACHE_TEXT.upper()) is None
    assert ccache_key(CCACHE_TEXT[:-1]) is None
    assert ccache_key("zz" + CCACHE_TEXT[2:]) is None  # the first 4 are hex
    assert ccache_key(CCACHE_TEXT[:10] + "w" + CCACHE_TEXT[11:]) is None  # w is not base32hex


def test_an_action_hash_is_not_mistaken_for_a_ccache_key():
    action = "0123456789abcdef" * 4
    assert route(f"/ns/ac/{action}") == Route("ac", action, "ns")
    # Only a key whose last 24 hex digits repeat its first 24 is ccache's.
    almost = CCACHE_BAZEL[:-1] + ("0" if CCACHE_BAZEL[-1] != "0" else "1")
    assert route(f"/ns/ac/{almost}").kind == "ac"


@pytest.mark.parametrize("path, status", [
    ("/cas/xyz", 400),
    (f"/cas/{H.upper()}", 400),
    (f"/ac/{H}0", 400),
    ("/", 404),
    ("/nothing/here", 404),
    (f"/../cas/{H}", 404),
    (f"//cas/{H}", 404),
    (f"/x/./cas/{H}", 404),
    ("/" + "n" * 300 + f"/cas/{H}", 404),
    ("cas", 400),
])
def test_bad_paths(path, status):
    with pytest.raises(RouteError) as info:
        route(path)
    assert info.value.status == status
    assert info.value.message


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials():
    assert credentials_match("Bearer s3cret", "s3cret")
    assert credentials_match("bearer  s3cret ", "s3cret")
    assert credentials_match(_basic("anyone", "s3cret"), "s3cret")
    assert credentials_match(_basic("", "s3cret"), "s3cret")
    assert credentials_match(_basic("u", "pa:ss"), "pa:ss")
    assert not credentials_match(None, "s3cret")
    assert not credentials_match("Bearer wrong", "s3cret")
    assert not credentials_match(_basic("s3cret", "wrong"), "s3cret")  # the token is the password
    assert not credentials_match("Basic !!!notbase64", "s3cret")
    assert not credentials_match("Basic " + base64.b64encode(b"no-colon").decode(), "s3cret")
    assert not credentials_match("Digest s3cret", "s3cret")
    assert not credentials_match("s3cret", "s3cret")
    assert not credentials_match("Bearer s3créte", "s3cret")


def test_auth_decisions():
    assert auth_failure("PUT", None, None, False) is None  # no token: open
    assert auth_failure("GET", None, "t", False)
    assert auth_failure("GET", None, "t", True) is None
    assert auth_failure("HEAD", None, "t", True) is None
    assert auth_failure("PUT", None, "t", True)
    assert auth_failure("GET", "Bearer wrong", "t", True)  # wrong credentials are refused even for reads
    assert auth_failure("PUT", "Bearer t", "t", False) is None


@pytest.mark.parametrize("error, status", [
    (TooLarge("x"), 413),
    (DigestMismatch("x"), 400),
    (InvalidArgument("x"), 400),
    (FailedPrecondition("x"), 400),
    (NotFound("x"), 404),
    (ResourceExhausted("x"), 503),
    (TriodeError("x"), 500),
])
def test_status_of(error, status):
    assert status_of(error) == status
