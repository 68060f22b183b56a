"""ngalore_jax: Natural GaLore as composable optax gradient transformations."""

from ngalore_jax._accounting import optimizer_state_bytes
from ngalore_jax._adam8bit import ScaleByAdam8bitState
from ngalore_jax._adam8bit import scale_by_adam_8bit
from ngalore_jax._accounting import tree_bytes
from ngalore_jax._alias import OFFICIAL_CODE_SETTINGS
from ngalore_jax._alias import PRECONDITIONERS
from ngalore_jax._alias import galore
from ngalore_jax._alias import natural_galore
from ngalore_jax._apollo import APOLLO_PROJECTIONS
from ngalore_jax._apollo import APOLLO_SCALE_TYPES
from ngalore_jax._apollo import ApolloState
from ngalore_jax._apollo import apollo
from ngalore_jax._apollo import apollo_mini
from ngalore_jax._apollo import scale_by_apollo
from ngalore_jax._fira import FiraState
from ngalore_jax._fira import fira
from ngalore_jax._fira import scale_by_fira
from ngalore_jax._kronecker import KRONECKER_SIDES
from ngalore_jax._kronecker import KroneckerState
from ngalore_jax._kronecker import kronecker_precondition
from ngalore_jax._plans import PROJ_TYPES
from ngalore_jax._plans import MatrixAxes
from ngalore_jax._projection import REFRESH_POLICIES
from ngalore_jax._projection import SVD_METHODS
from ngalore_jax._projection import GaLoreProjectionState
from ngalore_jax._projection import galore_projection
from ngalore_jax._state_sharding import state_shardings
from ngalore_jax._woodbury import DAMPING_MODES
from ngalore_jax._woodbury import WoodburyState
from ngalore_jax._woodbury import natural_direction
from ngalore_jax._woodbury import woodbury_precondition

__all__ = (
    "APOLLO_PROJECTIONS",
    "APOLLO_SCALE_TYPES",
    "ApolloState",
    "DAMPING_MODES",
    "FiraState",
    "GaLoreProjectionState",
    "KRONECKER_SIDES",
    "KroneckerState",
    "MatrixAxes",
    "OFFICIAL_CODE_SETTINGS",
    "PRECONDITIONERS",
    "PROJ_TYPES",
    "REFRESH_POLICIES",
    "SVD_METHODS",
    "ScaleByAdam8bitState",
    "WoodburyState",
    "apollo",
    "apollo_mini",
    "fira",
    "galore",
    "galore_projection",
    "kronecker_precondition",
    "natural_direction",
    "natural_galore",
    "optimizer_state_bytes",
    "scale_by_adam_8bit",
    "scale_by_apollo",
    "scale_by_fira",
    "state_shardings",
    "tree_bytes",
    "woodbury_precondition",
)
