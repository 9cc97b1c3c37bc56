// A real click on the dashboard's cancel button, driven by Playwright in headless Chromium
// (coordinator/tests/dashboard.rs runs it): node cancel_click.js URL JOB_ID
// Accepts the confirmation dialog, waits for the job's badge to turn "cancelled", exits 0; any
// failure exits 1 with the reason.
const { chromium } = require('playwright-core');

(async () => {
  const [url, job] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.SMELT_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    let dialog = '';
    page.on('dialog', (d) => { dialog = d.message(); d.accept(); });
    page.on('pageerror', (e) => { console.error('page error: ' + e.message); process.exitCode = 1; });
    await page.goto(`${url}#/jobs/${job}`);
    const button = `button[data-cancel="${job}"]`;
    await page.waitForSelector(button, { timeout: 20000 });
    await page.click(button);
    await page.waitForSelector('#job .state.cancelled', { timeout: 20000 });
    if (!dialog.includes(`Cancel ${job}?`)) throw new Error(`no confirmation asked (dialog: ${JSON.stringify(dialog)})`);
    if (await page.$(button)) throw new Error('the cancel button is still offered');
    console.log(`cancelled ${job} by a click; confirmation: ${dialog}`);
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e.message || e); process.exit(1); });
