// Tell require.js where the ipywidgets HTML manager lives in this site, so that the fonts its
// bundle references load from the book itself (assets/html-manager/) and not relative to each page.
(function () {
  var here = document.currentScript.src;
  var assets = here.slice(0, here.lastIndexOf("/") + 1);
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": assets + "html-manager" } });
})();
