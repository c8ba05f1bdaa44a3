// Starts Swagger UI on the page's #swagger-ui, with the schema its data-openapi-url names. A file of its own so
// that the page's Content-Security-Policy allows scripts from this origin only, none inline. The token given in
// Authorize stays in this tab's memory: persistAuthorization (localStorage) stays off, and no validator is asked.
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  persistAuthorization: false,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
