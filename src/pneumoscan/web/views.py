"""Server-rendered pages: the upload page and its results, the model card, and health checks."""

from __future__ import annotations

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for

from pneumoscan.card import model_card
from pneumoscan.web.uploads import UploadError, predict_uploads, predictor

bp = Blueprint("views", __name__)

#: Metric columns of the model card page, in order.
CARD_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1_weighted", "ppv", "npv")


def point_choices(points: dict[str, float], default: str) -> list[tuple[str, str, float]]:
    """Operating points with the same threshold merged into one choice: ``(name, label, threshold)``.

    A selector whose entries coincide does nothing (the shipped model's balanced and
    high-specificity points are both 0.743), so the page offers each distinct threshold once,
    named by every point that has it, and no selector at all when there is only one.
    """
    groups: dict[float, list[str]] = {}
    for name, value in points.items():
        groups.setdefault(round(value, 6), []).append(name)
    # "balanced = high specificity": one threshold that is both points, not a choice between them
    return [(default if default in names else names[0], " = ".join(n.replace("_", " ") for n in names), value)
            for value, names in groups.items()]


def _page(results=None, error=None):
    model = predictor()
    return render_template("index.html", spec=model.spec, decision=model.decision,
                           operating_points=model.operating_points,
                           point_choices=point_choices(model.operating_points, model.decision.default_operating_point),
                           results=results, error=error,
                           downloadable=[{k: v for k, v in r.items() if k not in _NOT_DOWNLOADED and not k.endswith("_png")}
                                         for r in results or []],
                           review_words=REVIEW_WORDS, review_band=dict(model.decision.review) or None)


#: Page-only fields: the images and the refused upload itself stay out of the downloads.
_NOT_DOWNLOADED = frozenset({"http_status", "upload_b64"})
#: How each review reason reads on a result card.
REVIEW_WORDS = {
    "uncertain_probability": "the probability is close to the threshold, inside the review band",
    "near_gate_limit": "the film is unusual for this model: near the input gate's limit, or past it",
    "outside_gate": "the input gate would have refused this film; it was analysed anyway",
}


@bp.get("/")
def index():
    """The upload form."""
    return _page()


@bp.post("/")
def upload():
    """Predict the uploaded files and show one result card per file."""
    try:
        return _page(results=predict_uploads(layers=True))
    except UploadError as exc:
        return _page(error=str(exc)), exc.http_status


@bp.get("/model")
def model_card_page():
    """The loaded model's card as a page."""
    card = model_card(predictor().spec)
    choices = point_choices(card["decision"]["operating_points"], card["decision"]["default_operating_point"])
    return render_template("model.html", card=card, metric_names=CARD_METRICS, point_choices=choices)


@bp.route("/login", methods=["GET", "POST"])
def login():
    """With API keys on, the pages ask for a key once and keep it in the signed session cookie."""
    sign_in = current_app.extensions["pneumoscan_sign_in"]
    if not current_app.extensions["pneumoscan_api_keys"]:
        return redirect(url_for("views.index"))
    if request.method == "POST":
        if sign_in(request.form.get("api_key", "").strip()):
            return redirect(url_for("views.index"))
        return render_template("login.html", error="That key is not valid."), 401
    return render_template("login.html")


@bp.post("/logout")
def logout():
    """Forget the key this browser signed in with."""
    session.clear()
    return redirect(url_for("views.login"))


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for it at the root whatever the page says (a 404 in every log before)."""
    return current_app.send_static_file("favicon.ico")


@bp.get("/healthz")
def healthz():
    """The process is alive (the model was loaded when the app was created)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """200 once the model is loaded, its sha256 verified and one warm-up inference done."""
    if not current_app.extensions.get("pneumoscan_ready"):
        return {"status": "loading"}, 503
    spec = predictor().spec
    return {"status": "ready", "model": spec.name, "weights_sha256": spec.weights_sha256,
            "bundle_digest": predictor().digest, "backend": predictor().backend}
