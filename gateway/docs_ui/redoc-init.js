// Starts ReDoc on the page's #redoc, with the schema its data-openapi-url names: a file of its own, as the page's
// Content-Security-Policy allows no inline script.
const root = document.getElementById("redoc");
Redoc.init(root.dataset.openapiUrl, {}, root);
