"""pytest.ini: a DeprecationWarning raised from the project's own code (the package, its tests) fails
the test, so deprecated calls are fixed at the source, never hidden; third-party ones stay filtered."""
import warnings

import pytest


def _warn_from(module: str) -> None:
    warnings.warn_explicit("deprecated call", DeprecationWarning, f"{module.replace('.', '/')}.py", 1,
                           module=module)


@pytest.mark.parametrize("module", ["stepvideo_jax.models.layers", "tests.test_scan"])
def test_deprecation_from_project_code_fails(module):
    with pytest.raises(DeprecationWarning, match="deprecated call"):
        _warn_from(module)


def test_third_party_deprecation_stays_filtered():
    with warnings.catch_warnings(record=True) as seen:
        _warn_from("flax.nnx.module")
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning)]
