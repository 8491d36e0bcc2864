"""Recipes: one YAML file declares the whole score -> prune -> heal -> evaluate -> measure pipeline."""

from .runner import RecipeRun, run_recipe
from .schema import SCHEMA, apply_overrides, load_recipe, validate

__all__ = ["SCHEMA", "RecipeRun", "apply_overrides", "load_recipe", "run_recipe", "validate"]
