"""Records, names, tags, lineage, context capture and REF resolution.

The CLI is driven as a user types it (``snapfs.cli.main.main([...])``, and a
real subprocess where the command line itself matters); stores are real (a
directory and a loopback SeaweedFS via ``store_url``). Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import snapfs
from snapfs import records
from snapfs.cli.main import main
from snapfs.errors import AlreadyExistsError, NotFoundError, UsageError
from snapfs.repo import Repo

SNAPFS = str(Path(sys.executable).with_name("snapfs"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


@pytest.fixture
def code_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A committed git work tree, made the current directory (where context is captured)."""
    work = tmp_path / "code"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "config", "user.email", "t@example.org")
    git(work, "config", "user.name", "T")
    (work / "train.py").write_text("print('train')\n")
    (work / "config.yaml").write_text("lr: 0.1\n")
    git(work, "add", ".")
    git(work, "commit", "-q", "-m", "init")
    monkeypatch.chdir(work)
    return work


# -- names, series, lineage -------------------------------------------------------


def test_three_versions_and_a_model_show_their_lineage(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    ids = []
    for version in (1, 2, 3):
        make_tree(data, {f"part-{version}.csv": f"rows of v{version}\n", "README": "dataset\n"})
        pushed = run_json(
            capsys, "push", str(data), "--store", store_url, "--name", f"ds@{version}", "-m", f"v{version}"
        )
        assert pushed["name"] == f"ds@{version}" and pushed["created"] is True
        ids.append(pushed["id"])
    model = make_tree(tmp_path / "model", {"weights.bin": "w"})
    pushed = run_json(
        capsys,
        "push",
        str(model),
        "--store",
        store_url,
        "--name",
        "resnet@1",
        "--input",
        "ds@2",
        "--meta",
        "accuracy=0.89",
    )
    assert pushed["inputs"][0]["snapshot"] == ids[1]
    assert pushed["parents"] == []  # first of its series

    # SERIES@VERSION recorded the series' latest as parent, automatically.
    assert run_json(capsys, "show", "ds@3", "--store", store_url)["parents"][0]["name"] == "ds@2"
    assert run_json(capsys, "show", "ds@1", "--store", store_url)["parents"] == []

    tree = run_json(capsys, "ancestors", "resnet@1", "--store", store_url)
    assert tree["name"] == "resnet@1"
    [dataset] = tree["ancestors"]
    assert (dataset["relation"], dataset["name"], dataset["snapshot"]) == ("input", "ds@2", ids[1])
    [parent] = dataset["ancestors"]
    assert (parent["relation"], parent["name"], parent["snapshot"]) == ("parent", "ds@1", ids[0])
    assert parent["ancestors"] == []

    code, out, _ = run(capsys, "ancestors", "resnet@1", "--store", store_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("resnet@1  ")
    assert "input: ds@2" in lines[1] and ids[1][:12] in lines[1]
    assert "parent: ds@1" in lines[2] and ids[0][:12] in lines[2]
    assert "ds@3" not in out

    # The same lineage through the Python API.
    api_tree = snapfs.ancestors("resnet@1", store=store_url)
    assert api_tree["ancestors"][0]["ancestors"][0]["name"] == "ds@1"
    assert snapfs.show("resnet@1", store=store_url)["meta"] == {"accuracy": 0.89}


def test_refs_resolve_everywhere(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_tree(tmp_path / "d", {"a": "1"})
    first = run_json(capsys, "push", str(data), "--store", store_url, "--name", "imgs@1.9.0")
    make_tree(data, {"b": "2"})
    second = run_json(capsys, "push", str(data), "--store", store_url, "--name", "imgs@1.10.0")
    repo = Repo.open(store_url)
    sid = second["id"]
    assert records.resolve_ref(repo, sid) == sid
    assert records.resolve_ref(repo, sid[:10]) == sid
    assert records.resolve_ref(repo, "imgs@1.10.0") == sid
    assert records.resolve_ref(repo, "imgs@latest") == sid
    assert records.resolve_ref(repo, second["record"]) == sid  # a record ID
    assert records.lookup(repo, second["record"][:12]).kind == "record"
    with pytest.raises(NotFoundError, match="no name 'imgs@2'"):
        records.resolve_ref(repo, "imgs@2")

    # Existing commands gain names: ls, diff --stat, pull.
    code, out, _ = run(capsys, "ls", "imgs@latest", "--store", store_url)
    assert code == 0 and out.split() == ["a", "b"]
    code, out, _ = run(capsys, "diff", "imgs@1.9.0", "imgs@latest", "--stat", "--store", store_url)
    assert code == 0 and out.strip().startswith("1 added, 0 deleted, 0 modified")
    copy = tmp_path / "copy"
    assert run(capsys, "pull", "imgs@1.9.0", str(copy), "--store", store_url)[0] == 0
    assert sorted(os.listdir(copy)) == ["a"]
    assert first["id"] != sid


def test_names_are_create_once(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_tree(tmp_path / "d", {"a": "1"})
    first = run_json(capsys, "push", str(data), "--store", store_url, "--name", "ds@1")
    # Same content: a no-op that still adds the new tag.
    again = run_json(capsys, "push", str(data), "--store", store_url, "--name", "ds@1", "--tag", "gold")
    assert again["created"] is False and again["record"] == first["record"] and again["tags"] == ["gold"]
    # Other content: refused, exit 6, and the name still points where it did.
    make_tree(data, {"a": "changed"})
    code, _, err = run(capsys, "push", str(data), "--store", store_url, "--name", "ds@1")
    assert code == 6 and "already exists" in err
    assert records.resolve_ref(Repo.open(store_url), "ds@1") == first["id"]
    # Invalid names fail before anything is uploaded.
    for bad in ("bad name", "a/b", "x@latest", "deadbeef12", "a@b@c", ".hidden", ""):
        with pytest.raises(SystemExit) as exc:
            main(["push", str(data), "--store", store_url, "--name", bad])
        assert exc.value.code == 2
    capsys.readouterr()


def test_racing_pushes_of_one_name_have_one_winner(store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(store_url)
    snapshot_ids = []
    for i in range(4):
        snapshot_ids.append(snapfs.push(make_tree(tmp_path / f"d{i}", {"f": str(i)}), repo))
    outcomes: list[object] = [None] * 4
    barrier = threading.Barrier(4)

    def name_it(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = records.create(repo, snapshot_ids[i], name="race@1", git=False, env=False)
        except AlreadyExistsError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=name_it, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, records.Created)]
    assert len(winners) == 1, outcomes
    assert records.resolve_ref(repo, "race@1") == snapshot_ids[winners[0]]
    # Losers leave no stray records behind.
    assert [r.name for r in records.all_records(repo)] == ["race@1"]


def test_latest_is_by_record_time_then_version() -> None:
    entries = [
        records.NameEntry("s@1.9", "a" * 64, "1" * 64, "2026-01-01T00:00:00.000000Z"),
        records.NameEntry("s@1.10", "b" * 64, "2" * 64, "2026-01-01T00:00:00.000000Z"),
        records.NameEntry("s@0.1-hotfix", "c" * 64, "3" * 64, "2025-12-31T23:59:59.999999Z"),
    ]
    # Equal times: the natural version order decides (1.10 after 1.9), never the string order.
    assert max(entries, key=records.NameEntry.sort_key).name == "s@1.10"
    later = records.NameEntry("s@0.2", "d" * 64, "4" * 64, "2026-01-02T00:00:00.000000Z")
    assert max([*entries, later], key=records.NameEntry.sort_key).name == "s@0.2"


# -- tags -------------------------------------------------------------------------


def test_tags_label_add_remove_and_filter(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = run_json(
        capsys,
        "push",
        str(make_tree(tmp_path / "a", {"x": "1"})),
        "--store",
        store_url,
        "--name",
        "a@1",
        "--tag",
        "baseline",
    )
    b = run_json(
        capsys, "push", str(make_tree(tmp_path / "b", {"x": "2"})), "--store", store_url, "--tag", "scratch"
    )
    assert a["tags"] == ["baseline"] and b["tags"] == ["scratch"]
    assert "record" not in b  # tags alone write no record
    code, out, _ = run(capsys, "tag", "a@1", "production", "paper", "--store", store_url)
    assert code == 0 and out.strip().endswith("baseline, paper, production")
    run(capsys, "tag", "a@1", "paper", "--remove", "--store", store_url)
    assert run_json(capsys, "show", "a@1", "--store", store_url)["tags"] == ["baseline", "production"]
    assert [e["name"] for e in run_json(capsys, "log", "--tag", "production", "--store", store_url)] == [
        "a@1"
    ]
    # A tagged snapshot without a record is still listed under its tag.
    [bare] = run_json(capsys, "log", "--tag", "scratch", "--store", store_url)
    assert bare["snapshot"] == b["id"] and bare["id"] is None

    # Concurrent taggers of one snapshot never lose each other's labels.
    repo = Repo.open(store_url)
    labels = [f"t{i}" for i in range(8)]
    threads = [threading.Thread(target=records.set_tags, args=(repo, a["id"], [t])) for t in labels]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(labels) <= set(records.tags_of(repo, a["id"]))


# -- context capture and secrets ------------------------------------------------------

SECRET_REMOTES = {
    "https": "https://alice:S3CRETuserinfo1@github.com/org/repo.git?private_token=S3CRETquery1&x=1#S3CRETfrag1",
    "ssh": "ssh://deploy:S3CRETuserinfo2@git.example.org:2222/org/repo.git?access_token=S3CRETquery2#S3CRETfrag2",
    "ftp": "ftp://anon:S3CRETuserinfo3@ftp.example.org/pub/repo.git?token=S3CRETquery3#S3CRETfrag3",
    "scp": "S3CRETuserinfo4@gitlab.example.com:org/repo.git?token=S3CRETquery4#S3CRETfrag4",
    "token-in-user": "https://ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/org/repo.git",
}


@pytest.mark.parametrize("kind", sorted(SECRET_REMOTES))
def test_remote_credentials_never_reach_a_record(
    kind: str, file_store_url: str, tmp_path: Path, code_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = SECRET_REMOTES[kind]
    git(code_repo, "remote", "add", "origin", url)
    data = make_tree(tmp_path / "d", {"a": kind})
    pushed = run_json(capsys, "push", str(data), "--store", file_store_url, "--name", f"ds-{kind}@1")
    code, out, _ = run(capsys, "show", f"ds-{kind}@1", "--store", file_store_url, "--json")
    assert code == 0
    shown = json.loads(out)
    raw = Repo.open(file_store_url).store.get(f"records/{pushed['record']}").decode()
    for text in (out, raw):
        assert "S3CRET" not in text
        assert "ghp_" not in text
    remote = shown["git"]["remote"]
    host = {
        "https": "github.com",
        "ssh": "git.example.org",
        "ftp": "ftp.example.org",
        "scp": "gitlab.example.com",
    }
    assert host.get(kind, "github.com") in remote and "repo.git" in remote
    assert shown["git"]["commit"] == git(code_repo, "rev-parse", "HEAD")
    assert shown["git"]["branch"] == "main" and shown["git"]["dirty"] is False


def test_sanitize_url_cases() -> None:
    s = records.sanitize_url
    assert s("https://user:pw@github.com/o/r.git") == "https://github.com/o/r.git"
    assert s("https://oauth2:glpat-abcdefghijklmnopqrst@gitlab.com/o/r.git") == "https://gitlab.com/o/r.git"
    assert s("ssh://git@github.com/o/r.git") == "ssh://git@github.com/o/r.git"  # the conventional user stays
    assert s("ssh://git:pw@github.com/o/r.git") == "ssh://github.com/o/r.git"
    assert s("git@github.com:o/r.git") == "git@github.com:o/r.git"
    assert s("tok:pw@host:o/r.git#frag") == "host:o/r.git"
    assert s("https://host/o/r.git?private_token=abc") == "https://host/o/r.git"
    assert s("https://[::1]:8443/r.git?a=b#c") == "https://[::1]:8443/r.git"
    assert s("/srv/git/repo.git") == "/srv/git/repo.git"
    assert "ghp_" not in s("https://host/ghp_abcdefghijklmnopqrstuvwxyz0123/r.git")


def test_command_line_and_metadata_are_redacted() -> None:
    argv = [
        "train.py",
        "--hf-token",
        "hf_abcdefghijklmnopqrstuvwxyz",
        "--api-key=abc123",
        "--max-tokens",
        "512",
        "DB_PASSWORD=hunter2",
        "--data",
        "https://u:pw@host/x.git?sig=zzz",
        "--author",
        "alice",
        "AKIAABCDEFGHIJKLMNOP",
    ]
    out = records.redact_argv(argv)
    joined = " ".join(out)
    for secret in ("hf_abc", "abc123", "hunter2", "pw@", "zzz", "AKIAABCD"):
        assert secret not in joined
    assert out[:2] == ["train.py", "--hf-token"] and out[2] == records.REDACTED
    assert "--max-tokens" in out and "512" in out  # tokens != token
    assert "alice" in out and "https://host/x.git" in out
    meta, redacted = records.redact_meta(
        {"aws_secret_access_key": "x", "accuracy": 0.9, "note": "ghp_abcdefghijklmnopqrstuv"}
    )
    assert meta == {"aws_secret_access_key": records.REDACTED, "accuracy": 0.9, "note": records.REDACTED}
    assert sorted(redacted) == ["aws_secret_access_key", "note"]


def test_record_run_pins_inputs_outputs_and_context(
    file_store_url: str, tmp_path: Path, code_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_tree(tmp_path / "data", {"train.csv": "1,2\n"})
    snapfs.push(data, file_store_url, name="ds@1", tags=["release"])
    monkeypatch.setattr(sys, "argv", ["train.py", "--wandb-api-key", "k3y", "--epochs", "3"])
    out = make_tree(tmp_path / "ckpt", {"model.pt": "weights"})
    # Inputs may be REFs or a local directory that must be a stored snapshot.
    run_view = snapfs.record_run(
        inputs=["ds@1", str(data)], outputs=out, meta={"accuracy": 0.89}, name="model@1", store=file_store_url
    )
    assert run_view["name"] == "model@1" and run_view["meta"] == {"accuracy": 0.89}
    assert [i["name"] for i in run_view["inputs"]] == ["ds@1", "ds@1"]
    assert run_view["command"] == ["train.py", "--wandb-api-key", records.REDACTED, "--epochs", "3"]
    assert run_view["git"]["commit"] == git(code_repo, "rev-parse", "HEAD")
    assert run_view["env"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "pytest" in run_view["env"]["packages"]
    assert run_view["snapshot"] == snapfs.id(out)
    [entry] = snapfs.log("model", store=file_store_url)
    assert entry["id"] == run_view["id"]
    assert snapfs.log(store=file_store_url, tag="release")[0]["name"] == "ds@1"
    make_tree(tmp_path / "other", {"x": "unpushed"})
    with pytest.raises(NotFoundError, match="push it first"):
        snapfs.record_run(inputs=[str(tmp_path / "other")], outputs=out, store=file_store_url)


def test_no_git_no_env_and_plain_push(file_store_url: str, tmp_path: Path, code_repo: Path, capsys) -> None:
    data = make_tree(tmp_path / "d", {"a": "1"})
    plain = run_json(capsys, "push", str(data), "--store", file_store_url)
    assert "record" not in plain  # only the snapshot marker
    assert run_json(capsys, "log", "--store", file_store_url) == []
    view = run_json(
        capsys, "push", str(data), "--store", file_store_url, "--name", "d@1", "--no-git", "--no-env"
    )
    shown = run_json(capsys, "show", view["record"], "--store", file_store_url)
    assert shown["git"] is None and shown["env"] is None and shown["name"] == "d@1"


def test_cli_command_line_is_recorded_redacted(file_store_url: str, tmp_path: Path) -> None:
    """A real process: the argv snapfs records is its own command line, scrubbed."""
    data = make_tree(tmp_path / "d", {"a": "1"})
    cmd = [SNAPFS, "push", str(data), "--store", file_store_url, "--name", "d@1", "-q"]
    cmd += ["--meta", "db_password=hunter2", "--meta", "lr=0.001", "--meta", "run=007"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        [SNAPFS, "show", "d@1", "--store", file_store_url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "hunter2" not in shown
    view = json.loads(shown)
    assert view["meta"] == {"db_password": records.REDACTED, "lr": 0.001, "run": "007"}
    assert view["command"][1:4] == ["push", str(data), "--store"]
    assert "db_password=<redacted>" in view["command"]


# -- reproduce, preflight, forget ------------------------------------------------------------


def test_reproduce_prints_every_step(file_store_url: str, tmp_path: Path, code_repo: Path, capsys) -> None:
    git(code_repo, "remote", "add", "origin", "https://tok:S3CRET@github.com/org/repo.git")
    ds = run_json(
        capsys,
        "push",
        str(make_tree(tmp_path / "d", {"a": "1"})),
        "--store",
        file_store_url,
        "--name",
        "ds@1",
    )
    run_json(
        capsys,
        "push",
        str(make_tree(tmp_path / "m", {"w": "1"})),
        "--store",
        file_store_url,
        "--name",
        "net@1",
        "--input",
        "ds@1",
        "--meta",
        "accuracy=0.89",
    )
    code, out, _ = run(capsys, "reproduce", "net@1", "--store", file_store_url)
    assert code == 0
    commit = git(code_repo, "rev-parse", "HEAD")
    assert "git clone https://github.com/org/repo.git" in out and f"git checkout {commit}" in out
    assert "pip install -r requirements.txt" in out
    assert f"snapfs pull {ds['id']} ./ds@1" in out
    assert "accuracy: 0.89" in out
    assert "S3CRET" not in out
    code, out, _ = run(capsys, "reproduce", "net@1", "--requirements", "--store", file_store_url)
    assert code == 0 and any(line.startswith("pytest==") for line in out.splitlines())


def test_preflight_refuses_unpinned_runs(
    file_store_url: str, tmp_path: Path, code_repo: Path, capsys
) -> None:
    data = tmp_path / "d"
    ds1 = run_json(
        capsys, "push", str(make_tree(data, {"a": "1"})), "--store", file_store_url, "--name", "ds@1"
    )
    run_json(capsys, "push", str(make_tree(data, {"b": "2"})), "--store", file_store_url, "--name", "ds@2")
    store = ["--store", file_store_url]

    code, out, _ = run(
        capsys, "preflight", "--data", "ds@1", "--data", ds1["id"], "--config", "config.yaml", *store
    )
    assert code == 0 and out.startswith("preflight ok")

    code, out, _ = run(capsys, "preflight", "--data", "ds@latest", "--data", ds1["id"][:12], *store)
    assert code == 1
    assert "moves with every new version" in out and "pin ds@2" in out
    assert f"pin the full ID {ds1['id']}" in out

    code, out, _ = run(capsys, "preflight", "--data", "nope@1", *store)
    assert code == 1 and "no name 'nope@1'" in out

    (code_repo / "config.yaml").write_text("lr: 0.2\n")
    (code_repo / "new.yaml").write_text("x: 1\n")
    report = run(
        capsys,
        "preflight",
        "--data",
        "ds@1",
        "--config",
        "config.yaml",
        "--config",
        "new.yaml",
        *store,
        "--json",
    )
    assert report[0] == 1
    reasons = json.loads(report[1])["reasons"]
    assert any("dirty" in r and "config.yaml" in r for r in reasons)
    assert any("config config.yaml has uncommitted changes" in r for r in reasons)
    assert any("config new.yaml is not tracked" in r for r in reasons)


def test_forget_keeps_the_name_reserved(store_url: str, tmp_path: Path, capsys) -> None:
    data = make_tree(tmp_path / "d", {"a": "1"})
    first = run_json(capsys, "push", str(data), "--store", store_url, "--name", "exp@1")
    twin = run_json(capsys, "push", str(data), "--store", store_url, "--name", "exp-copy@1")
    forgot = run_json(capsys, "forget", "exp@1", "--store", store_url)
    # Another live name holds the same snapshot, so it stays marked.
    assert forgot["unmarked"] is False and forgot["still_claimed_by"] == ["exp-copy@1"]
    code, _, err = run(capsys, "ls", "exp@1", "--store", store_url)
    assert code == 3 and "forgotten" in err
    code, _, err = run(capsys, "push", str(data), "--store", store_url, "--name", "exp@1")
    assert code == 6 and "already exists (forgotten" in err
    # A bare ID cannot drop a claim that live names still hold.
    code, _, err = run(capsys, "forget", first["id"], "--store", store_url)
    assert code == 2 and "exp-copy@1" in err
    assert run_json(capsys, "forget", "exp-copy@1", "--store", store_url)["unmarked"] is True
    assert not Repo.open(store_url).is_snapshot(twin["id"])
    # Forgotten records stay visible to lineage and `log --all`.
    assert [e["name"] for e in run_json(capsys, "log", "--all", "--store", store_url)] == [
        "exp-copy@1",
        "exp@1",
    ]
    assert run_json(capsys, "log", "--store", store_url) == []
    shown = run_json(capsys, "show", "exp@1", "--store", store_url)
    assert shown["forgotten"] is True
    assert records.list_names(Repo.open(store_url)) == []


def test_mount_helpers_list_and_resolve_names(file_store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(file_store_url)
    sid = snapfs.push(make_tree(tmp_path / "d", {"a": "1"}), repo, name="cifar@1", capture_git=False)
    snapfs.push(make_tree(tmp_path / "e", {"a": "2"}), repo, name="cifar@2", capture_git=False)
    assert records.list_names(repo) == ["cifar@1", "cifar@2"]
    assert records.resolve_name(repo, "cifar@1") == sid
    with pytest.raises(NotFoundError):
        records.resolve_name(repo, "cifar@3")


def test_validation_units() -> None:
    assert records.validate_name("imagenet@1.2.0") == ("imagenet", "1.2.0")
    assert records.validate_name("baseline") == (None, None)
    assert records.validate_name("cafe") == (None, None)  # short hex is fine: prefixes need 8 digits
    for bad in ("CAFEBABE00", "x@LATEST", "a b", "-x", "x@", "@x", "a" * 129):
        with pytest.raises(UsageError):
            records.validate_name(bad)
    assert records.parse_meta(["a=0.89", "b=12", "c=true", "d=007", "e=text", "f=1e-3", "g=nan"]) == {
        "a": 0.89,
        "b": 12,
        "c": True,
        "d": "007",
        "e": "text",
        "f": 0.001,
        "g": "nan",
    }
    assert records.is_secret_name("AWS_SECRET_ACCESS_KEY") and records.is_secret_name("apiKey")
    assert records.is_secret_name("--hf-token") and records.is_secret_name("private_key")
    assert not records.is_secret_name("max_tokens") and not records.is_secret_name("author")
    assert not records.is_secret_name("keys") and not records.is_secret_name("monkey")
