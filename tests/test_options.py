"""Unit tests of ``-o`` parsing (atomicfs/options.py): pure logic, no mount."""

from __future__ import annotations

import pytest

from atomicfs.options import MountOptions, OptionError, parse_options, split_option_args


def parse(*items: str, root: bool = True, source: str = "/data") -> MountOptions:
    return parse_options(list(items), source=source, is_root=root)


# -- split_option_args -------------------------------------------------------------------

def test_split_flattens_repeated_and_comma_separated_arguments() -> None:
    assert split_option_args(["a,b", "c", "d=1,e"]) == ["a", "b", "c", "d=1", "e"]


def test_split_drops_empty_items_and_blanks() -> None:
    assert split_option_args([",a,,b,", " c , ", "", ","]) == ["a", "b", "c"]
    assert split_option_args([]) == []


def test_split_keeps_order_and_duplicates() -> None:
    assert split_option_args(["ro", "ro,noatime"]) == ["ro", "ro", "noatime"]


# -- defaults ----------------------------------------------------------------------------

def test_defaults_as_root() -> None:
    opts = parse()
    assert (opts.durability, opts.isolation, opts.commit, opts.debug) == (
        "full", "committed", "auto", False)
    assert opts.fuse == {"allow_other", "default_permissions", "fsname=/data",
                         "subtype=atomicfs"}


def test_defaults_as_non_root_have_no_allow_other() -> None:
    opts = parse(root=False)
    assert opts.fuse == {"default_permissions", "fsname=/data", "subtype=atomicfs"}


def test_defaults_do_not_leak_between_calls() -> None:
    a = parse("ro")
    b = parse()
    assert "ro" in a.fuse and "ro" not in b.fuse
    assert a.fuse is not b.fuse


# -- atomicfs's own options --------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("durability", "full"), ("durability", "batch"),
    ("isolation", "committed"), ("isolation", "shared"),
    ("commit", "auto"), ("commit", "rename"), ("commit", "journal"),
])
def test_own_options_take_each_allowed_value(key: str, value: str) -> None:
    opts = parse(f"{key}={value}")
    assert getattr(opts, key) == value
    # never passed on to libfuse
    assert not any(o.startswith(key) for o in opts.fuse)


def test_repeated_own_option_last_one_wins() -> None:
    opts = parse("durability=batch", "isolation=shared", "durability=full")
    assert opts.durability == "full"
    assert opts.isolation == "shared"


def test_debug_flag() -> None:
    opts = parse("debug")
    assert opts.debug is True
    assert "debug" not in opts.fuse  # run() adds it itself


# -- FUSE options ------------------------------------------------------------------------

def test_fuse_flags_pass_through() -> None:
    flags = ["ro", "nosuid", "nodev", "noexec", "noatime", "auto_unmount", "dirsync"]
    opts = parse(*flags)
    assert set(flags) <= opts.fuse


def test_mount_fuse3_default_flags_accepted() -> None:
    # what mount(8) hands to mount.fuse3 and mount.fuse3 to us
    opts = parse("rw", "dev", "suid")
    assert {"rw", "dev", "suid"} <= opts.fuse


def test_no_allow_other_drops_the_root_default() -> None:
    opts = parse("no_allow_other")
    assert "allow_other" not in opts.fuse
    assert "default_permissions" in opts.fuse
    assert "no_allow_other" not in opts.fuse


def test_no_default_permissions_drops_that_default() -> None:
    opts = parse("no_default_permissions")
    assert "default_permissions" not in opts.fuse
    assert "allow_other" in opts.fuse
    assert not any(o.startswith("no_") for o in opts.fuse)


def test_both_negations() -> None:
    opts = parse("no_allow_other", "no_default_permissions")
    assert opts.fuse == {"fsname=/data", "subtype=atomicfs"}


def test_negation_as_non_root_is_harmless() -> None:
    opts = parse("no_allow_other", root=False)
    assert "allow_other" not in opts.fuse


def test_explicit_allow_other_as_non_root() -> None:
    assert "allow_other" in parse("allow_other", root=False).fuse


def test_fsname_default_is_source_with_commas_replaced() -> None:
    assert "fsname=/srv/a_b_c" in parse(source="/srv/a,b,c").fuse
    assert "fsname=relative" in parse(source="relative").fuse


def test_explicit_fsname_and_subtype_replace_the_defaults() -> None:
    opts = parse("fsname=mydata", "subtype=special")
    assert {o for o in opts.fuse if o.startswith(("fsname=", "subtype="))} == {
        "fsname=mydata", "subtype=special"}


def test_repeated_valued_option_last_one_wins() -> None:
    opts = parse("fsname=first", "max_read=4096", "fsname=second", "max_read=65536")
    assert {o for o in opts.fuse if o.startswith("fsname=")} == {"fsname=second"}
    assert {o for o in opts.fuse if o.startswith("max_read=")} == {"max_read=65536"}


def test_valued_option_value_may_contain_equals() -> None:
    opts = parse("fsname=a=b")
    assert "fsname=a=b" in opts.fuse


# -- fstab words -------------------------------------------------------------------------

@pytest.mark.parametrize("word", [
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
    "nofail", "loop", "x-systemd.automount", "x-systemd.requires=/dev/sda",
    "x-anything", "comment=systemd.automount",
])
def test_fstab_words_are_accepted_and_dropped(word: str) -> None:
    assert parse(word).fuse == parse().fuse


def test_fstab_line_as_mount_passes_it() -> None:
    items = split_option_args(["defaults,_netdev,nofail,x-systemd.automount,ro,durability=batch"])
    opts = parse(*items)
    assert opts.durability == "batch"
    assert opts.fuse == parse("ro").fuse


# -- errors: each names the offending option ---------------------------------------------

@pytest.mark.parametrize(("items", "named"), [
    (["bogus"], "bogus"),
    (["allow_other", "frobnicate=3"], "frobnicate=3"),
    (["durability=maybe"], "maybe"),
    (["durability"], "durability"),
    (["durability="], "durability"),
    (["isolation=x"], "isolation"),
    (["isolation=Committed"], "Committed"),
    (["commit=copy"], "commit"),
    (["ro=1"], "ro=1"),                     # a flag given a value
    (["allow_other=yes"], "allow_other=yes"),
    (["debug=1"], "debug=1"),
    (["fsname"], "fsname"),                 # a valued option without a value
    (["fsname="], "fsname="),
    (["subtype="], "subtype="),
    (["max_read=abc"], "max_read"),
    (["max_read=-1"], "max_read"),
    (["no_ro"], "no_ro"),                   # only two negations exist
    (["no_"], "no_"),
    (["Ro"], "Ro"),                         # case matters, as in mount(8)
    (["x"], "'x'"),
    (["entry_timeout"], "entry_timeout"),
    (["entry_timeout="], "entry_timeout"),
    (["entry_timeout=soon"], "entry_timeout"),
    (["entry_timeout=-1"], "entry_timeout"),
    (["attr_timeout=nan"], "attr_timeout"),
    (["attr_timeout=inf"], "attr_timeout"),
    (["attr_timeout=3601"], "attr_timeout"),
])
def test_errors_raise_option_error_naming_the_option(items: list[str], named: str) -> None:
    with pytest.raises(OptionError) as info:
        parse(*items)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("items", [["ro", "rw"], ["rw", "ro"], ["ro", "nosuid", "rw"]])
def test_ro_and_rw_together_is_an_error(items: list[str]) -> None:
    with pytest.raises(OptionError) as info:
        parse(*items)
    message = str(info.value)
    assert "ro" in message and "rw" in message


def test_bad_value_message_lists_the_allowed_values() -> None:
    with pytest.raises(OptionError) as info:
        parse("durability=maybe")
    assert "full" in str(info.value) and "batch" in str(info.value)


def test_error_after_valid_options_still_raises() -> None:
    with pytest.raises(OptionError, match="nonsense"):
        parse("ro", "durability=batch", "nonsense")


def test_option_error_is_a_value_error() -> None:
    assert issubclass(OptionError, ValueError)


def test_cache_timeouts_default_and_take_seconds() -> None:
    opts = parse()
    assert (opts.entry_timeout, opts.attr_timeout) == (10.0, 10.0)
    opts = parse("entry_timeout=0", "attr_timeout=2.5")
    assert (opts.entry_timeout, opts.attr_timeout) == (0.0, 2.5)
    assert parse("attr_timeout=3600").attr_timeout == 3600.0
    assert not any("timeout" in o for o in opts.fuse), "atomicfs's own: not passed to libfuse"
