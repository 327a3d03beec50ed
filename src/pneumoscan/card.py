"""The model card of a bundle, as one JSON-safe dict (served at ``/api/v1/model`` and ``/model``).

Everything here is read from ``model.json``; nothing is computed, so the card says only what the
bundle's training and recorded evaluations measured.
"""

from __future__ import annotations

from typing import Any

from dataclasses import asdict

from pneumoscan import __version__
from pneumoscan.spec import BundleSpec

INTENDED_USE = ("Research and education: pneumonia-vs-normal classification of paediatric "
                "chest radiographs. Not for clinical use or diagnosis.")
POPULATION = ("Kermany et al. (2018) chest X-ray set: paediatric patients aged 1-5, "
              "anterior-posterior views, one centre (Guangzhou Women and Children's Medical Center).")
LIMITATIONS = (
    "Not validated on adults, lateral views, other hospitals or other scanners.",
    "Validation figures come from a split carved from the training data and overstate performance "
    "on the official test split, whose images differ (most test errors are normal images called pneumonia).",
)
GATED = ("Images far from the training distribution are refused by the input gate, but the gate cannot catch "
         "every unusual chest film.")
UNGATED = ("This bundle has NO input gate on its features: only colour, blank, tiny and lateral images are refused; "
           "greyscale photographs, documents, other body parts and films unlike its training data get a "
           "confident-looking answer. Fit one with 'pneumoscan fit-gate'.")
#: A bundle trained on a site's own data says so instead of the Kermany text.
OWN_DATA_LIMITATIONS = (
    "Trained on the data described above only; not validated on other populations, hospitals or scanners.",
    "Validation figures come from a split carved from the training data and overstate performance on new films.",
)
NOT_DESCRIBED = ("Not described: train with --population \"...\" (ages, views, centres, scanners) "
                 "to say who these films come from.")


def _population_and_limits(spec: BundleSpec, training: dict[str, Any]) -> tuple[str, list[str], dict | None]:
    """Population text, limitations and the dataset block: the run's own data when the bundle
    records it, the Kermany set's description otherwise (the bundled model, older bundles)."""
    dataset = training.get("dataset")
    gate = GATED if spec.gate is not None else UNGATED
    if not dataset:
        return POPULATION, [*LIMITATIONS, gate], None
    limits = [*OWN_DATA_LIMITATIONS, gate]
    if spec.gate is not None and spec.gate.limit_from == "cross-fitted":
        limits.append(f"Too few validation films to set the input gate's limit alone: it was cross-fitted over the "
                      f"{spec.gate.n_train + spec.gate.n_val} training and validation films (each measured by "
                      "statistics fitted without it), so it rests on few films too.")
    if training.get("few_validation_images"):
        limits.insert(0, "Its validation split holds fewer than 20 images of a class: its thresholds and validation "
                         "figures rest on too few to trust, and no temperature was fitted.")
    return training.get("population") or NOT_DESCRIBED, limits, dataset


def _validation_section(spec: BundleSpec) -> dict[str, Any]:
    """Validation figures from training: point estimates per operating point (no CIs were computed)."""
    metrics = spec.val_metrics
    if not metrics:
        return {}
    points = metrics.get("calibration", {}).get("operating_points") or {
        spec.decision.default_operating_point: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    return {"n": metrics.get("n"), "n_by_class": metrics.get("n_by_class"),
            "source": "patient-grouped validation split carved from train/ (chosen on it)",
            "operating_points": points}


#: TrainConfig fields the card shows as the recipe (a test checks that training writes each one),
#: plus what the run itself adds. ``class_weighting`` is what bundles before ``--class-balance`` wrote.
RECIPE_KEYS = ("backbone", "weights", "head", "input_size", "equalize", "epochs", "frozen_epochs",
               "finetune_blocks", "lr", "finetune_lr_factor", "batch_size", "augmentation", "class_balance",
               "label_smoothing", "ema_decay", "seed", "split_seed")
RUN_KEYS = ("best_checkpoint", "fit_seconds")
LEGACY_RECIPE_KEYS = ("class_weighting",)


def model_card(spec: BundleSpec) -> dict[str, Any]:
    """The card: identity, data, intended use, metrics per operating point with CIs, calibration."""
    provenance = spec.provenance
    members = provenance.training.get("members") or []
    # An ensemble records each member's recipe; they differ only in their seeds.
    training = members[0] if members else provenance.training
    decision = spec.decision
    train_counts = training.get("train_counts") or []
    calibration = spec.val_metrics.get("calibration", {})
    population, limitations, dataset = _population_and_limits(spec, training)
    metrics: dict[str, Any] = {}
    validation = _validation_section(spec)
    if validation:
        metrics["validation_at_training"] = validation
    metrics.update(spec.reported_metrics)  # e.g. "test", "validation": values with 95% CIs
    return {
        "name": spec.name,
        "version": {"pneumoscan": provenance.versions.get("pneumoscan", ""), "server": __version__,
                    "bundle_format": spec.format_version, "created": provenance.created},
        "weights_sha256": spec.weights_sha256,
        "architecture": {"backbone": spec.backbone, "head": spec.head, "input_size": spec.input_size,
                         "histogram_equalized": spec.equalize,
                         "weights_dtype": spec.weights_dtype, "class_names": list(spec.class_names)},
        "intended_use": INTENDED_USE,
        "population": population,
        "limitations": limitations,
        "gated": spec.gate is not None,
        "distilled_from": ({"name": training["teacher_name"], "bundle_sha256": training["teacher_bundle_sha256"],
                            "soft_target_weight": training.get("distill_weight"),
                            "temperature": training.get("distill_temperature")}
                           if training.get("teacher_bundle_sha256") else None),
        "training_data": {
            "dataset": f"{dataset['folder']} (sha256 {dataset['sha256'][:16]}...)" if dataset
            else "Kermany chest X-ray (Kaggle layout)",
            "own_data": dataset,
            "n_train": sum(train_counts) if train_counts else None,
            "n_train_by_class": dict(zip(spec.class_names, train_counts)) if train_counts else None,
            "n_validation": spec.val_metrics.get("n"),
            "n_validation_by_class": spec.val_metrics.get("n_by_class"),
            "validation_split": "patient-grouped, carved from train/ (split.csv in the bundle)",
            "split_manifest_sha256": provenance.split_manifest_sha256,
            "recipe": {key: training[key] for key in RECIPE_KEYS + RUN_KEYS + LEGACY_RECIPE_KEYS
                       if key in training},
            "ensemble": ({"members": spec.members, "member_seeds": [m.get("seed") for m in members],
                          "combination": "mean of the members' log-odds, calibrated on validation"}
                         if spec.members > 1 else None),
        },
        "decision": {"default_operating_point": decision.default_operating_point, "threshold": decision.threshold,
                     "threshold_source": decision.threshold_source,
                     "operating_points": dict(decision.operating_points),
                     "site_calibration": dict(decision.site) or None,
                     "review_band": dict(decision.review) or None},
        "calibration": {"method": decision.calibration, "temperature": decision.temperature,
                        **{key: calibration[key] for key in ("ece_15_before", "ece_15_after",
                                                             "brier_before", "brier_after", "n")
                           if key in calibration}},
        "input_gate": ({key: value for key, value in asdict(spec.gate).items()
                        if key not in ("file", "sha256", "extractor_file", "extractor_sha256")}
                       if spec.gate is not None else {}),
        "metrics": metrics,
    }
