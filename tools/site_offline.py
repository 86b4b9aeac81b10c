"""Sphinx extension (loaded by _config.yml): keep the static site self-contained.

Jupyter Book 1 always loads sphinx-thebe, which declares its configuration script
twice on every page (a JavaScript error) and names a CDN address. This course does
not use Thebe (launch buttons open Colab instead), so its scripts are left out.
"""


def _drop_thebe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    kept = []
    for script in scripts:
        filename = getattr(script, "filename", None) or str(script)
        body = getattr(script, "attributes", {}).get("body", "")
        if "thebe" in filename or "THEBE_JS_URL" in body:
            continue
        kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
