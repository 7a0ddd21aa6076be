"""Attack core: interpreters of IDLSes and the attacks against them (ADV2, AdvEdge, AdvEdge+ on PGD / C&W / StAdv,
the top-k interpretation attack). Pure PyTorch: it never imports Lightning or ``defend``.

A flat namespace, as torchattacks has::

    import attacks
    cam = attacks.CAMInterpreter()
    attack = attacks.build_attack("adv2", "pgd", "cam", eps=8 / 255)
    res = attack(model, x, target_classes)          # res.x_adv, res.success, res.target_prob
    maps = cam(model, res.x_adv, target_classes)    # detached [N, 1, H, W] in [0, 1]

Every attack follows one contract (:class:`Attack`): ``attack(model, x, y) -> result`` (``x_adv`` on the uint8 grid,
inside the attack's constraint, per-input ``success``) and ``attack.budget`` (a plain dict: framework, eps, steps, ...).

Registries (filled where things are defined): :data:`INTERPRETERS`, :data:`FRAMEWORKS`, :data:`ATTACKS` (the
targeted attacks on an IDLS: ``factory(framework, interpreter, **options)``) and :data:`BALL_ATTACKS` (fixed L-inf
ball, no framework: ``factory(eps, interpreter, **options)``: top-k, noise; ``defend`` adds the discrepancy attack and
AutoAttack).
"""
from __future__ import annotations

from .adaptive import DetectorAwareTerm, Restarts, Transfer, map_l1, stack_channels
from .adv2 import ADV2, make_term, random_targets
from .base_attack import BALL_ATTACKS, Attack, AttackResult, goal_reached
from .certify import (
                         CertificateCheck,
                         MapCertificate,
                         PredictionCertificate,
                         SmoothedLogits,
                         certified_accuracy,
                         certify_map,
                         certify_prediction,
                         check_certificates,
                         clopper_pearson_lower,
                         dual_radius,
                         prediction_counts,
                         project_l2,
                         smoothed_l2_attack,
                         topk_counts,
)
from .edges import edge_weights, sobel_edges
from .factory import ATTACKS, build_attack, interpretation_attacks, uses_interpreter
from .frameworks import (
                         CW,
                         FRAMEWORKS,
                         PGD,
                         StAdv,
                         ThreatModel,
                         get_framework,
                         pgd_maximise,
                         quantise_linf,
                         threat_options,
)
from .interpreters import (
                         INTERPRETERS,
                         CAMInterpreter,
                         GradInterpreter,
                         Interpreter,
                         MaskInterpreter,
                         ReluModifier,
                         RTSInterpreter,
                         RTSNetwork,
                         get_interpreter,
                         relu_as_softplus,
                         relu_surrogate,
)
from .noise import NoiseAttack
from .state import eval_mode, frozen
from .terms import EnsembleTerm, InterpretationTerm, MapTerm
from .topk import ReferenceTopKAttack, TopKAttack, TopKResult

__all__ = [
    "Attack", "BALL_ATTACKS", "goal_reached", "NoiseAttack", "uses_interpreter", "interpretation_attacks", "threat_options",
    "ADV2", "AttackResult", "build_attack", "make_term", "random_targets", "ATTACKS",
    "Interpreter", "GradInterpreter", "CAMInterpreter", "MaskInterpreter", "RTSInterpreter", "RTSNetwork",
    "INTERPRETERS", "get_interpreter", "relu_surrogate", "relu_as_softplus", "ReluModifier",
    "ThreatModel", "PGD", "CW", "StAdv", "FRAMEWORKS", "get_framework", "pgd_maximise", "quantise_linf",
    "InterpretationTerm", "MapTerm", "EnsembleTerm", "TopKAttack", "TopKResult", "ReferenceTopKAttack",
    "DetectorAwareTerm", "Restarts", "Transfer", "map_l1", "stack_channels",
    "sobel_edges", "edge_weights", "frozen", "eval_mode",
    "PredictionCertificate", "MapCertificate", "CertificateCheck", "SmoothedLogits", "clopper_pearson_lower",
    "prediction_counts", "topk_counts", "certify_prediction", "certify_map", "dual_radius", "certified_accuracy",
    "smoothed_l2_attack", "project_l2", "check_certificates",
]
