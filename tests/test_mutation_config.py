"""`make mutate`'s configuration stays true to the code (the mutation run itself is not part of
`make test`): every module path and Lua script exists, every hand-made Lua mutant applies,
every equivalent mutant still exists, and every mutant compiles."""

from __future__ import annotations

import ast

import pytest

from tests.mutation.mutants import Mutant, load_config, lua_text_mutants, module_mutants

CONFIG = load_config()
# Each module's source and mutants, made once for every test here.
MUTANTS = {cfg.name: module_mutants(cfg, CONFIG) for cfg in CONFIG.modules}


@pytest.mark.parametrize("cfg", CONFIG.modules, ids=lambda c: c.name)
def test_each_module_of_the_mutation_run_exists_with_its_tests(cfg: object) -> None:
    from tests.mutation.mutants import ROOT, ModuleConfig

    assert isinstance(cfg, ModuleConfig)
    assert cfg.path.is_file(), f"{cfg.path} moved: update tests/mutation/modules.toml"
    for arg in cfg.tests:
        assert (ROOT / arg.split("::")[0]).exists(), arg


@pytest.mark.parametrize("cfg", CONFIG.modules, ids=lambda c: c.name)
def test_every_mutant_of_a_module_compiles_and_differs(cfg: object) -> None:
    from tests.mutation.mutants import ModuleConfig

    assert isinstance(cfg, ModuleConfig)
    source, mutants = MUTANTS[cfg.name]
    assert mutants
    keys = [m.key for m in mutants]
    assert len(keys) == len(set(keys))
    for m in mutants:
        mutated = m.apply(source)
        assert mutated != source
        ast.parse(mutated)


def test_every_equivalent_mutant_names_one_that_exists() -> None:
    keys: dict[str, set[str]] = {}
    for cfg in CONFIG.modules:
        keys[cfg.name] = {m.key for m in MUTANTS[cfg.name][1]}
    stale = [e for e in CONFIG.equivalents if e.mutant not in keys.get(e.module, set())]
    assert not stale, f"equivalent.toml names mutants that no longer exist: {stale}"
    assert all(e.why.strip() for e in CONFIG.equivalents)


def test_every_hand_made_lua_mutant_is_made() -> None:
    made = {
        m.key
        for cfg in CONFIG.modules
        for m in MUTANTS[cfg.name][1]
        if m.kind == "lua" and ": hand: " in m.key
    }
    assert len(made) == len(CONFIG.lua_mutants)


def test_lua_token_mutants_swap_operators_and_leave_strings_alone() -> None:
    line = "if a >= 1 and b == 'x>y' then"
    made = dict(lua_text_mutants(f"{line}\n  redis.call('DEL', KEYS[1])\nend"))
    assert {label.split(" -> ")[1] for label in made if label.startswith(line)} == {
        "if a > 1 and b == 'x>y' then",
        "if a >= 2 and b == 'x>y' then",
        "if a >= 1 or b == 'x>y' then",
        "if a >= 1 and b ~= 'x>y' then",
    }
    assert "redis.call('DEL', KEYS[1]) -> (deleted)" in made


def test_a_mutant_is_a_splice_of_the_source() -> None:
    m = Mutant("x", "k", 1, 4, 5, b"-")
    assert m.apply(b"a = 1 + 2") == b"a = - + 2"
