// Starts ReDoc on the page's #redoc, with the schema its data-openapi-url names: a file of its own, as the page's
// Content-Security-Policy allows no inline script. ReDoc writes its styles as <style> elements, which the policy
// allows only with the nonce this script carries. Native scrollbars: the stylesheet of the scrollbars ReDoc draws
// otherwise is written before ReDoc is given the nonce, so the policy refuses it (its one message in the console).
const root = document.getElementById("redoc");
Redoc.init(root.dataset.openapiUrl, { nonce: document.currentScript.nonce, nativeScrollbars: true }, root);
