"""Local rules: conditions over metrics, inference results and device state -> actions."""

from edgeagent.core.expr import Expr, parse
from edgeagent.rules.component import RulesComponent
from edgeagent.rules.engine import Action, RuleEngine, Transition, parse_action

__all__ = ["Action", "Expr", "RuleEngine", "RulesComponent", "Transition", "parse", "parse_action"]
